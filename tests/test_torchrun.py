"""fairseq-train under torchrun with gloo on CPU: 2 and 4 workers, resume, DDP backend guard."""

import os
import re
import sys

import pytest
import torch

from test_end_to_end import data_bin, run  # noqa: F401  (fixture)

BIN = os.path.dirname(sys.executable)
TINY_MODEL = ["--task", "language_modeling", "--arch", "transformer_lm_base", "--decoder-layers", "2",
              "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
              "--tokens-per-sample", "64", "--sample-break-mode", "none", "--batch-size", "8",
              "--optimizer", "adam", "--lr", "0.003", "--clip-norm", "0.5", "--log-format", "simple",
              "--no-epoch-checkpoints", "--num-workers", "0", "--seed", "3"]


def torchrun_train(workers, data, save_dir, *flags, check=True):
    # `$(which fairseq-train)` in the README: the console script beside this Python.
    env_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(workers),
               os.path.join(BIN, "fairseq-train"), str(data / "bin"), "--user-dir", "fairseq_base", "--cpu",
               "--distributed-backend", "gloo", *TINY_MODEL, "--save-dir", str(save_dir), *flags]
    os.environ["OMP_NUM_THREADS"] = "1"
    return run(*env_cmd, check=check)


def losses(result):
    found = re.findall(r"\| train_inner \| .*?loss=([0-9.]+).*?num_updates=(\d+)", result.stdout + result.stderr)
    return {int(update): float(loss) for loss, update in found}


@pytest.mark.parametrize("workers", [2, 4])
def test_multi_worker_training(data_bin, tmp_path, workers):  # noqa: F811
    result = torchrun_train(workers, data_bin, tmp_path, "--base-experts", str(2 * workers),
                            "--ddp-backend", "legacy_ddp", "--max-update", "40", "--log-interval", "5")
    curve = losses(result)
    assert curve[40] < curve[5] - 0.5, curve
    shards = [torch.load(tmp_path / f"checkpoint_last-rank-{r}.pt", weights_only=False)["model"]
              for r in range(workers)]
    expert_key = next(k for k in shards[0] if ".experts.0.0.ff1.weight" in k)
    ids_key = next(k for k in shards[0] if k.endswith("expert_ids"))
    for r, shard in enumerate(shards):
        assert shard[ids_key].tolist() == [2 * r, 2 * r + 1]
        for key, value in shard.items():
            if ".experts." not in key and not key.endswith("expert_ids"):
                assert torch.equal(value, shards[0][key]), key  # shared parameters stay in sync
    for r in range(1, workers):
        assert not torch.allclose(shards[r][expert_key], shards[0][expert_key])  # experts stay distinct


def test_resume_matches_uninterrupted_run(data_bin, tmp_path):  # noqa: F811
    common = ["--base-experts", "4", "--ddp-backend", "legacy_ddp", "--log-interval", "1"]
    straight = losses(torchrun_train(2, data_bin, tmp_path / "straight", *common, "--max-update", "16"))
    torchrun_train(2, data_bin, tmp_path / "resumed", *common, "--max-update", "8")
    assert (tmp_path / "resumed" / "checkpoint_last-rank-1.pt").exists()
    resumed = losses(torchrun_train(2, data_bin, tmp_path / "resumed", *common, "--max-update", "16"))
    assert sorted(resumed) == list(range(9, 17))
    for update, loss in resumed.items():
        assert abs(loss - straight[update]) <= 1e-3 * straight[update], (update, loss, straight[update])


def test_averaging_ddp_backend_is_refused(data_bin, tmp_path):  # noqa: F811
    result = torchrun_train(2, data_bin, tmp_path, "--ddp-backend", "pytorch_ddp", "--max-update", "2",
                            check=False)
    assert result.returncode != 0
    assert "fairseq_base: error: --ddp-backend pytorch_ddp would average the experts" in result.stderr
    assert "use --ddp-backend legacy_ddp" in result.stderr
    assert not list(tmp_path.glob("checkpoint*"))


def test_expert_count_not_divisible_by_workers_is_refused(data_bin, tmp_path):  # noqa: F811
    result = torchrun_train(2, data_bin, tmp_path, "--base-experts", "3", "--ddp-backend", "legacy_ddp",
                            "--max-update", "2", check=False)
    assert result.returncode != 0
    assert "fairseq_base: error: --base-experts 3 cannot be split over 2 workers" in result.stderr


def test_fully_sharded_with_experts_is_one_line(data_bin, tmp_path):  # noqa: F811
    result = torchrun_train(2, data_bin, tmp_path, "--ddp-backend", "fully_sharded", "--max-update", "2",
                            check=False)
    assert result.returncode != 0
    errors = {line.split("]: ", 1)[-1] for line in result.stderr.splitlines() if "fairseq_base: error:" in line}
    assert errors == {"fairseq_base: error: --ddp-backend fully_sharded would shard the experts like shared "
                      "parameters (and needs fairscale); use --ddp-backend legacy_ddp"}, result.stderr[-2000:]
    assert "fairscale with: pip install" not in result.stderr  # fairseq's import error never comes

"""fairseq-train under torchrun with gloo on CPU: the guards on DDP backends and expert counts."""

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


def torchrun_command(workers, data, save_dir, *flags):
    # `$(which fairseq-train)` in the README: the console script beside this Python.
    os.environ["OMP_NUM_THREADS"] = "1"
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(workers),
            os.path.join(BIN, "fairseq-train"), str(data / "bin"), "--user-dir", "fairseq_base", "--cpu",
            "--distributed-backend", "gloo", *TINY_MODEL, "--save-dir", str(save_dir), *flags]


def torchrun_train(workers, data, save_dir, *flags, check=True):
    return run(*torchrun_command(workers, data, save_dir, *flags), check=check)


def error_messages(stderr):
    """The distinct "fairseq_base: error:" messages in ``stderr``, also where the lines of two
    workers ran together (torchrun prefixes each worker's lines with "[rankN]: ")."""
    return {"fairseq_base: error:" + message.rstrip()
            for message in re.findall(r"fairseq_base: error:(.*?)(?=fairseq_base: error:|\n|$)", stderr)}


def losses(result):
    found = re.findall(r"\| train_inner \| .*?loss=([0-9.]+).*?num_updates=(\d+)", result.stdout + result.stderr)
    return {int(update): float(loss) for loss, update in found}


def test_averaging_ddp_backend_is_refused(data_bin, tmp_path):  # noqa: F811
    result = torchrun_train(2, data_bin, tmp_path, "--ddp-backend", "slowmo", "--max-update", "2",
                            check=False)
    assert result.returncode != 0
    assert "fairseq_base: error: --ddp-backend slowmo would average the experts" in result.stderr
    assert "use --ddp-backend c10d or legacy_ddp" in result.stderr
    assert not list(tmp_path.glob("checkpoint*"))


def test_expert_count_not_divisible_by_workers_is_refused(data_bin, tmp_path):  # noqa: F811
    result = torchrun_train(2, data_bin, tmp_path, "--base-experts", "3", "--ddp-backend", "legacy_ddp",
                            "--max-update", "2", check=False)
    assert result.returncode != 0
    assert ("fairseq_base: error: --base-experts 3 cannot be split over the 2 workers of an expert-parallel group"
            in result.stderr)


def test_fully_sharded_with_experts_is_one_line(data_bin, tmp_path):  # noqa: F811
    result = torchrun_train(2, data_bin, tmp_path, "--ddp-backend", "fully_sharded", "--max-update", "2",
                            check=False)
    assert result.returncode != 0
    assert error_messages(result.stderr) == {
        "fairseq_base: error: --ddp-backend fully_sharded would shard the experts like shared parameters (and needs "
        "fairscale); use --ddp-backend c10d or legacy_ddp"}, result.stderr[-2000:]
    assert "fairscale with: pip install" not in result.stderr  # fairseq's import error never comes

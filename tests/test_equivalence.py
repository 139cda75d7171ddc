"""fairseq-train on W workers matches one process with the same global batch, and --bf16
trains on CPU, in one process and on 2 gloo workers."""

import os
import re
import sys

import pytest
import torch

from test_end_to_end import data_bin, run  # noqa: F401  (fixture)
from test_torchrun import BIN, TINY_MODEL, losses, torchrun_train

# No dropout and no shuffled routing: every worker's batch is then one micro-batch of the
# single process (fairseq gives worker r batches r, r + W, ...; --update-freq W groups them).
SAME_MATH = ["--base-shuffle", "0", "--dropout", "0", "--attention-dropout", "0", "--base-experts", "4",
             "--max-update", "10", "--log-interval", "1", "--no-save-optimizer-state", "--ddp-backend", "legacy_ddp"]


def one_process_train(data, save_dir, *flags):
    return run(os.path.join(BIN, "fairseq-train"), str(data / "bin"), "--user-dir", "fairseq_base", *TINY_MODEL,
               "--save-dir", str(save_dir), *flags)


def global_parameters(save_dir, workers, num_experts=4):
    """{name: tensor} of the whole model, with expert j of worker r under its global id."""
    if workers == 1:
        return torch.load(save_dir / "checkpoint_last.pt", weights_only=False)["model"]
    shards = [torch.load(save_dir / f"checkpoint_last-rank-{r}.pt", weights_only=False)["model"]
              for r in range(workers)]
    merged = {}
    for rank, shard in enumerate(shards):
        for key, value in shard.items():
            match = re.match(r"(.*\.experts\.)(\d+)(\..*)", key)
            if match:
                global_id = rank * (num_experts // workers) + int(match.group(2))
                merged[f"{match.group(1)}{global_id}{match.group(3)}"] = value
            elif not key.endswith("expert_ids"):
                assert torch.equal(value, shards[0][key]), key  # shared parameters agree on every worker
                merged[key] = value
    return merged


def assert_same_losses(one, many, loss_tolerance):
    assert sorted(one) == sorted(many) == list(range(1, 11))
    for update in one:
        assert abs(one[update] - many[update]) <= loss_tolerance, (update, one[update], many[update])


def assert_same_parameters(one, many, tolerance):
    assert sorted(k for k in one if not k.endswith("expert_ids")) == sorted(many)
    worst = max((one[k].float() - many[k].float()).abs().max().item() for k in many)
    assert worst <= tolerance, worst


def test_two_workers_match_one_process_with_the_same_global_batch(data_bin, tmp_path):  # noqa: F811
    """Adam and --clip-norm 0.5 (in TINY_MODEL), 10 updates. Fails if expert gradients are not
    divided by W (parameters then differ by about 4e-3), if the clip norm covers experts, or
    if the two layouts start from different experts."""
    single = losses(one_process_train(data_bin, tmp_path / "one", *SAME_MATH, "--cpu", "--update-freq", "2"))
    double = losses(torchrun_train(2, data_bin, tmp_path / "two", *SAME_MATH))
    assert_same_losses(single, double, loss_tolerance=1e-3)  # logged with 3 decimals
    assert_same_parameters(global_parameters(tmp_path / "one", 1), global_parameters(tmp_path / "two", 2), 1e-4)


@pytest.mark.cuda
def test_two_gpus_with_fp16_and_nccl_match_one_gpu(data_bin, tmp_path):  # noqa: F811
    """The same on GPUs in fp16 (loss scaling, the flat fp32 copy), with NCCL. fp16 sums in
    another order on each layout, so the tolerances are fp16's."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    gpu = ["--fp16", "--fp16-init-scale", "16"]
    single = losses(one_process_train(data_bin, tmp_path / "one", *SAME_MATH, *gpu, "--update-freq", "2"))
    double = losses(run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(BIN, "fairseq-train"), str(data_bin / "bin"), "--user-dir", "fairseq_base",
                        *TINY_MODEL, "--save-dir", str(tmp_path / "two"), "--distributed-backend", "nccl",
                        *SAME_MATH, *gpu))
    assert_same_losses(single, double, loss_tolerance=2e-2)
    assert_same_parameters(global_parameters(tmp_path / "one", 1), global_parameters(tmp_path / "two", 2), 2e-2)


@pytest.mark.parametrize("workers", [1, 2])
def test_bf16_trains_on_cpu(data_bin, tmp_path, workers):  # noqa: F811
    flags = ["--bf16", "--base-experts", "4", "--max-update", "30", "--log-interval", "5"]
    if workers == 1:
        result = one_process_train(data_bin, tmp_path, *flags, "--cpu")
    else:
        result = torchrun_train(2, data_bin, tmp_path, *flags, "--ddp-backend", "legacy_ddp")
    curve = losses(result)
    assert curve[30] < curve[5] - 0.3, curve
    saved = torch.load(next(tmp_path.glob("checkpoint_last*.pt")), weights_only=False)
    assert saved["cfg"]["common"]["bf16"] and not saved["cfg"]["common"]["tpu"]
    assert "loss_scale" not in saved["last_optimizer_state"]  # fairseq's FP16Optimizer, bf16 (no loss scaling)
    if workers == 2:
        global_parameters(tmp_path, 2)  # shared parameters identical on both workers

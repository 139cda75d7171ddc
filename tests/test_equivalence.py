"""fairseq-train on W workers matches one process with the same global batch, and --bf16
trains on CPU, in one process and on 2 gloo workers."""

import os
import sys

import pytest
import torch

from fairseq_base.experts import EXPERT_IDS
from fairseq_runs import BIN, TINY_MODEL, losses, run, torchrun_train, trained_once

# No dropout and no shuffled routing: every worker's batch is then one micro-batch of the
# single process (fairseq gives worker r batches r, r + W, ...; --update-freq W groups them).
SAME_MATH = ["--base-shuffle", "0", "--dropout", "0", "--attention-dropout", "0",
             "--max-update", "10", "--log-interval", "1", "--no-save-optimizer-state",
             # Adam divides by sqrt(v) + eps: with fairseq's 1e-8 an element whose gradient is rounding noise
             # moves by up to lr either way, which turns 4-worker summation order into 1e-4 differences.
             "--adam-eps", "1e-6"]


def one_process_command(data, save_dir, *flags):
    return [os.path.join(BIN, "fairseq-train"), str(data / "bin"), "--user-dir", "fairseq_base", *TINY_MODEL,
            "--save-dir", str(save_dir), *flags]


def one_process_train(data, save_dir, *flags):
    return run(*one_process_command(data, save_dir, *flags))


def global_parameters(save_dir, files, name="checkpoint_last"):
    """{name: tensor} of the whole model: the stacked experts of the P files joined in rank order
    (file r holds the experts after those of files 0..r-1)."""
    if files == 1:
        return torch.load(save_dir / f"{name}.pt", weights_only=False)["model"]
    shards = [torch.load(save_dir / f"{name}-rank-{r}.pt", weights_only=False)["model"]
              for r in range(files)]
    merged = {}
    for key, value in shards[0].items():
        if ".experts." in key:
            merged[key] = torch.cat([shard[key] for shard in shards])
        elif not key.endswith(EXPERT_IDS):
            for shard in shards[1:]:
                assert torch.equal(shard[key], value), key  # shared parameters agree on every worker
            merged[key] = value
    return merged


def assert_same_losses(one, many, loss_tolerance, updates=10):
    """The losses logged at updates 1..``updates`` agree."""
    one, many = ({u: curve[u] for u in curve if u <= updates} for curve in (one, many))
    assert sorted(one) == sorted(many) == list(range(1, updates + 1))
    for update in one:
        assert abs(one[update] - many[update]) <= loss_tolerance, (update, one[update], many[update])


def assert_same_parameters(one, many, tolerance):
    assert sorted(k for k in one if not k.endswith(EXPERT_IDS)) == sorted(many)
    worst = max((one[k].float() - many[k].float()).abs().max().item() for k in many)
    assert worst <= tolerance, worst


def biases_differ(one, many):
    return any(not torch.allclose(one[key], many[key], rtol=0, atol=1e-6) for key in many if key.endswith("expert_bias"))


def assert_same_training_until_a_bias_step_flips(one_at, many_at, updates, tolerance):
    """lossfree's bias moves by a discrete step per update: up or down by the sign of each
    expert's load error. Where an expert's load sits within a token of the mean, rounding that
    differs between one process and two (summation order) can flip a step on one CPU and not
    another, and from there the runs route differently. So the runs are compared, update by
    update, as long as every bias step was the same: parameters within ``tolerance`` and biases
    equal. Update 1 always counts: its forward passes are bit for bit the same in both runs, so
    a bias that differs after it is a real difference (a bias from one worker's load, say), not
    rounding. ``one_at(u)``, ``many_at(u)``: {name: tensor} after update u. Returns the last
    update compared."""
    for update in range(1, updates + 1):
        one, many = one_at(update), many_at(update)
        if biases_differ(one, many):
            assert update > 1, "the bias differs after update 1, whose loads were the same in both runs"
            return update - 1
        assert_same_parameters(one, many, tolerance)
    return updates


# (workers W, expert-parallel size P, experts E, DDP backend, router)
LAYOUTS = [(2, 2, 4, "c10d", "lossfree"), (2, 2, 4, "legacy_ddp", "lossfree"), (4, 2, 2, "c10d", "balanced"),
           (4, 2, 4, "legacy_ddp", "balanced"), (4, 4, 4, "c10d", "balanced")]
# The default tier keeps W = 2 under both DDP backends, against one one-process run. lossfree there:
# a discrete step that rounding flips is allowed for (``assert_same_training_until_a_bias_step_flips``);
# BASE's assignment has the same kind of step (a near tie between two experts that rounding breaks
# one way in one process and the other way on two workers; seen at W = 2, E = 4 on the Brown text),
# so its layouts are those that have agreed on both test texts, in the slow tier.
SLOW_LAYOUTS = LAYOUTS[2:]


def router_flags(router):
    """lossfree: at the BASE layer's position and in expert FFNs, with a bias that moves visibly in 10 steps,
    saved after every update (``assert_same_training_until_a_bias_step_flips``)."""
    if router == "balanced":
        return []
    return ["--base-router", router, "--base-moe-freq", "2", "--base-bias-update-rate", "0.01",
            "--save-interval-updates", "1"]


@pytest.fixture(scope="module")
def one_process_runs(data_bin, tmp_path_factory):
    """``one_process_runs(W, E, router)``: (losses, save_dir) of one process with --update-freq W and E
    experts, trained at the first test that asks for it (a tier runs only the cases it selects)."""
    def one_process_run(workers, num_experts, router):
        save_dir, result = trained_once(
            tmp_path_factory, f"one-{workers}-{num_experts}-{router}", lambda save_dir: one_process_command(
                data_bin, save_dir, *SAME_MATH, "--cpu", "--update-freq", str(workers), "--base-experts",
                str(num_experts), *router_flags(router)))
        return losses(result), save_dir
    return one_process_run


@pytest.mark.parametrize("workers,parallel,num_experts,backend,router", [
    pytest.param(*layout, id="W{}-P{}-E{}-{}-{}".format(*layout),
                 marks=[pytest.mark.slow] if layout in SLOW_LAYOUTS else [])
    for layout in LAYOUTS])
def test_workers_match_one_process_with_the_same_global_batch(data_bin, one_process_runs, tmp_path,
                                                              workers, parallel, num_experts, backend, router):
    """W workers in groups of P, under legacy_ddp and torch's DDP (c10d), against one process with
    --update-freq W: Adam and --clip-norm 0.5 (in TINY_MODEL), 10 updates. Fails if expert
    gradients are not summed over their W/P replicas or not divided by W (parameters then
    differ by about 4e-3), if DDP averages experts, if the clip norm covers experts, or if the
    layouts start from different experts. Only the first P workers write files, and replicas
    agree bit for bit (checked through their gradients' all-reduce by comparing every worker's
    experts in the checkpoint the P writers share). lossfree: its bias, updated from the load of
    both workers, is the same in both files (a shared entry) and the same as one process's, update
    by update, until rounding flips one of its discrete steps, if it does
    (``assert_same_training_until_a_bias_step_flips``)."""
    single, single_dir = one_process_runs(workers, num_experts, router)
    many = losses(torchrun_train(workers, data_bin, tmp_path, *SAME_MATH, "--ddp-backend", backend,
                                 "--base-experts", str(num_experts), "--base-expert-parallel-size", str(parallel),
                                 *router_flags(router)))
    assert sorted(p.name for p in tmp_path.glob("checkpoint_last*.pt")) == (
        [f"checkpoint_last-rank-{r}.pt" for r in range(parallel)])
    assert sorted(single) == sorted(many) == list(range(1, 11))
    updates = 10
    if router == "lossfree":
        updates = assert_same_training_until_a_bias_step_flips(
            lambda u: global_parameters(single_dir, 1, f"checkpoint_1_{u}"),
            lambda u: global_parameters(tmp_path, parallel, f"checkpoint_1_{u}"), 10, 1e-4)
    else:
        assert_same_parameters(global_parameters(single_dir, 1), global_parameters(tmp_path, parallel), 1e-4)
    assert_same_losses(single, many, loss_tolerance=1e-3, updates=updates)  # logged with 3 decimals
    merged = global_parameters(tmp_path, parallel)
    biases = [key for key in merged if key.endswith("expert_bias")]
    assert len(biases) == (2 if router == "lossfree" else 0)
    assert all(merged[key].abs().max() > 0 for key in biases)


@pytest.mark.cuda(devices=2)
def test_two_gpus_with_fp16_and_nccl_match_one_gpu(data_bin, tmp_path, monkeypatch):
    """The same on GPUs in fp16 (loss scaling, the flat fp32 copy), with NCCL. fp16 sums in
    another order on each layout, so the tolerances are fp16's. The reference is one process
    on one GPU (fairseq's default world size is the number of GPUs it sees)."""
    gpu = ["--fp16", "--fp16-init-scale", "16"]
    with monkeypatch.context() as one_gpu:
        one_gpu.setenv("CUDA_VISIBLE_DEVICES", "0")
        single = losses(one_process_train(data_bin, tmp_path / "one", *SAME_MATH, *gpu, "--update-freq", "2",
                                          "--distributed-world-size", "1"))
    double = losses(run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(BIN, "fairseq-train"), str(data_bin / "bin"), "--user-dir", "fairseq_base",
                        *TINY_MODEL, "--save-dir", str(tmp_path / "two"), "--distributed-backend", "nccl",
                        *SAME_MATH, *gpu))
    assert_same_losses(single, double, loss_tolerance=2e-2)
    assert_same_parameters(global_parameters(tmp_path / "one", 1), global_parameters(tmp_path / "two", 2), 2e-2)


@pytest.mark.parametrize("workers,router", [(1, "balanced"), pytest.param(2, "balanced", marks=pytest.mark.slow), pytest.param(1, "lossfree", marks=pytest.mark.slow),
                                            pytest.param(2, "lossfree", marks=pytest.mark.slow)])
def test_bf16_trains_on_cpu(data_bin, tmp_path, workers, router):
    flags = ["--bf16", "--base-experts", "4", "--max-update", "30", "--log-interval", "5", *router_flags(router)]
    if workers == 1:
        result = one_process_train(data_bin, tmp_path, *flags, "--cpu")
    else:
        result = torchrun_train(2, data_bin, tmp_path, *flags, "--ddp-backend", "legacy_ddp")
    curve = losses(result)
    assert curve[30] < curve[5] - 0.3, curve
    saved = torch.load(next(tmp_path.glob("checkpoint_last*.pt")), weights_only=False)
    assert saved["cfg"]["common"]["bf16"] and not saved["cfg"]["common"]["tpu"]
    assert "loss_scale" not in saved["last_optimizer_state"]  # fairseq's FP16Optimizer, bf16 (no loss scaling)
    assert all(value.dtype == torch.float32 and value.abs().max() > 0
               for key, value in saved["model"].items() if key.endswith("expert_bias"))
    if workers == 2:
        global_parameters(tmp_path, 2)  # shared parameters identical on both workers
        models = [torch.load(tmp_path / f"checkpoint_last-rank-{r}.pt", weights_only=False)["model"] for r in range(2)]
        assert all(torch.equal(models[0][key], models[1][key]) for key in models[0] if key.endswith("expert_bias"))


def test_the_lossfree_comparison_allows_a_flipped_bias_step_and_nothing_else():
    """``assert_same_training_until_a_bias_step_flips`` on made-up runs: after a bias step that
    flipped at update 4 the runs may part; a bias that differs after update 1, or parameters that
    differ while every bias step was the same, fail it."""
    def run(bias_at, weight_at):
        return lambda u: {"layer.expert_bias": torch.tensor([bias_at(u)]), "weight": torch.tensor([weight_at(u)])}

    same = run(lambda u: 0.01 * u, lambda u: 0.1 * u)
    flipped_at_4 = run(lambda u: 0.01 * u if u < 4 else 0.01 * (u - 2), lambda u: 0.1 * u + (1.0 if u >= 4 else 0.0))
    assert assert_same_training_until_a_bias_step_flips(same, same, 10, 1e-4) == 10
    assert assert_same_training_until_a_bias_step_flips(same, flipped_at_4, 10, 1e-4) == 3
    with pytest.raises(AssertionError, match="differs after update 1"):
        assert_same_training_until_a_bias_step_flips(same, run(lambda u: -0.01 * u, lambda u: 0.1 * u), 10, 1e-4)
    with pytest.raises(AssertionError):  # every bias step the same, a weight 1e-3 off from update 2 on
        assert_same_training_until_a_bias_step_flips(same, run(lambda u: 0.01 * u, lambda u: 0.1 * u + 1e-3 * (u > 1)),
                                                     10, 1e-4)

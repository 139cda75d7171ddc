"""The local experts as stacked weights: the batched forward computes what one module per expert
did, and checkpoints written in the per-expert layout still evaluate, resume and reshard."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from expert_weights import expert_weights, per_expert_layout
from fairseq_base.experts import LocalExperts, expert_batches
from fairseq_base.reshard import reshard
from fairseq_runs import eval_loss, losses, router_run_command, run, torchrun_train


def one_expert(weights, x, num_sublayers):
    """Expert j written out as fairseq's BaseSublayer stack, one sublayer after another."""
    update = torch.zeros_like(x)
    for s in range(num_sublayers):
        w = {name.split(".", 2)[2]: value for name, value in weights.items() if name.startswith(f"sublayers.{s}.")}
        h = F.layer_norm(x + update, x.shape[-1:], w["norm_weight"], w["norm_bias"])
        update = update + F.relu(h @ w["ff1_weight"] + w["ff1_bias"]) @ w["ff2_weight"] + w["ff2_bias"]
    return update


@pytest.mark.parametrize("counts", [[5, 5, 5, 5], [6, 5, 5, 5], [2, 0, 5, 3], [17, 1, 1, 1], [0, 0, 0, 0]],
                         ids=["equal", "balanced", "uneven", "skewed", "empty"])
def test_the_batched_experts_compute_each_expert_on_its_own_tokens(counts):
    """Equal counts run as a view, balanced ones with one padded row, uneven ones padded to the
    busiest expert, and very skewed ones (padding more than doubling the rows) one by one: all
    give every token its own expert's update, and every expert's weights their gradient."""
    torch.manual_seed(0)
    experts = LocalExperts(range(4), 8, 16, num_sublayers=2, seed=3)
    for param in experts.parameters():  # ff2 starts at zero: give every weight a part to play
        torch.nn.init.normal_(param, std=0.3)
    tokens = torch.randn(sum(counts), 8, requires_grad=True)
    batches, slots = expert_batches(tokens.detach(), counts)
    if counts[0] == 17:
        assert batches is None  # 4 x 17 rows for 20 tokens: one by one
    elif len(set(counts)) == 1:
        assert slots is None
    else:
        assert batches.shape == (4, max(counts), 8)
    out = experts(tokens, counts)
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    chunks = tokens.detach().split(counts)
    for j, chunk in enumerate(chunks):
        weights = {name: value.clone().requires_grad_(True) for name, value in expert_weights(experts, j).items()}
        x = chunk.clone().requires_grad_(True)
        want = one_expert(weights, x, num_sublayers=2)
        start = sum(counts[:j])
        got = out[start:start + counts[j]]
        assert torch.allclose(got, want, atol=1e-5), j
        (want * torch.arange(out.numel()).view_as(out)[start:start + counts[j]].sin()).sum().backward()
        assert torch.allclose(tokens.grad[start:start + counts[j]], x.grad, atol=1e-5), j
        for name, param in experts.named_parameters():
            assert torch.allclose(param.grad[j], weights[name].grad, atol=1e-5), (j, name)


def train(data, save_dir, updates, *flags):
    """BASE's shared run (``router_run_command``: a BASE layer and expert FFNs, E = 4) to
    ``updates``, logging every update."""
    return run(*router_run_command(data, "balanced", save_dir, *flags, "--max-update", str(updates),
                                   "--log-interval", "1"))


def write_per_expert_layout(source, target):
    state = per_expert_layout(torch.load(source, weights_only=True))
    assert "decoder.layers.1.experts.1.0.ff1.weight" in state["model"]  # a BASE layer's local expert 1
    assert "decoder.layers.2.moe.experts.1.0.ff2.bias" in state["model"]  # an expert FFN's
    target.parent.mkdir(exist_ok=True)
    torch.save(state, target)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_checkpoint_in_the_per_expert_layout_evaluates_resumes_and_reshards(data_bin, router_runs, tmp_path, precision):  # noqa: E501
    """A checkpoint rewritten in the layout of one module per expert (optimizer state included: one
    entry per parameter in fp32, one flat entry in bf16) scores and resumes as the stacked one it
    came from; fairseq-base-reshard reads it, and old per-worker files, as the stacked files."""
    flags = ["--bf16"] if precision == "bf16" else []
    if flags:
        train(data_bin, tmp_path / "new", 15, *flags)
    else:  # BASE's shared run (conftest's router_runs), saved at update 15
        (tmp_path / "new").mkdir()
        shutil.copy(router_runs("balanced")[0] / "checkpoint_1_15.pt", tmp_path / "new" / "checkpoint_last.pt")
    write_per_expert_layout(tmp_path / "new" / "checkpoint_last.pt", tmp_path / "old" / "checkpoint_last.pt")
    if precision == "fp32":
        assert eval_loss(data_bin, tmp_path / "old" / "checkpoint_last.pt") == eval_loss(
            data_bin, tmp_path / "new" / "checkpoint_last.pt")
        two_new = reshard(str(tmp_path / "new" / "checkpoint_last.pt"), 2, str(tmp_path / "two-new.pt"))
        two_old = reshard(str(tmp_path / "old" / "checkpoint_last.pt"), 2, str(tmp_path / "two-old.pt"))
        for new, old in zip(two_new, two_old):
            assert_same_checkpoint(torch.load(new, weights_only=True), torch.load(old, weights_only=True))
        # Per-worker files of the old layout: read as a set, and scored on 2 workers.
        for rank, path in enumerate(two_new):
            write_per_expert_layout(path, tmp_path / "old-two" / f"model-rank-{rank}.pt")
        one = reshard(str(tmp_path / "old-two" / "model-rank-0.pt"), 1, str(tmp_path / "one.pt"))[0]
        assert_same_checkpoint(torch.load(one, weights_only=True),
                               torch.load(tmp_path / "new" / "checkpoint_last.pt", weights_only=True))
        assert eval_loss(data_bin, tmp_path / "old-two" / "model.pt", workers=2) == pytest.approx(
            eval_loss(data_bin, tmp_path / "one.pt"), abs=1e-4)
    else:  # the flat state of --bf16 through fairseq-base-reshard and back
        two = reshard(str(tmp_path / "old" / "checkpoint_last.pt"), 2, str(tmp_path / "two.pt"))
        back = reshard(two[0], 1, str(tmp_path / "back.pt"))[0]
        assert_same_checkpoint(torch.load(back, weights_only=True),
                               torch.load(tmp_path / "new" / "checkpoint_last.pt", weights_only=True))
    resumed = {name: losses(train(data_bin, tmp_path / name, 20, *flags)) for name in ("new", "old")}
    assert sorted(resumed["old"]) == list(range(16, 21)) and resumed["old"] == resumed["new"]


@pytest.mark.slow
def test_per_worker_files_in_the_per_expert_layout_resume_training_on_their_workers(data_bin, tmp_path):
    flags = ["--base-experts", "4", "--base-moe-freq", "2", "--ddp-backend", "legacy_ddp", "--log-interval", "1"]
    torchrun_train(2, data_bin, tmp_path / "new", *flags, "--max-update", "6")
    for rank in range(2):
        write_per_expert_layout(tmp_path / "new" / f"checkpoint_last-rank-{rank}.pt",
                                tmp_path / "old" / f"checkpoint_last-rank-{rank}.pt")
    resumed = {name: losses(torchrun_train(2, data_bin, tmp_path / name, *flags, "--max-update", "10"))
               for name in ("new", "old")}
    assert sorted(resumed["old"]) == list(range(7, 11)) and resumed["old"] == resumed["new"]


def assert_same_checkpoint(a, b):
    assert list(a["model"]) == list(b["model"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    optim_a, optim_b = a["last_optimizer_state"], b["last_optimizer_state"]
    assert optim_a["param_groups"][0]["params"] == optim_b["param_groups"][0]["params"]
    for index, entry in optim_a["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, optim_b["state"][index][key]) if torch.is_tensor(value) else (
                value == optim_b["state"][index][key]), (index, key)

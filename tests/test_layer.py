import os

import pytest
import torch
from torch import nn

from fairseq_base.dispatcher import TokenDispatcher
from fairseq_base.layer import BaseLayer, reduce_routing_stats
from fairseq_base.placement import base_layer_positions, paper_positions
from fairseq_base.errors import BaseLayerConfigError
from expert_weights import ScaledExperts, expert_weights


def scaled_identity_layer(num_experts, dim=8, **kwargs):
    layer = BaseLayer(dim, 16, num_experts, **kwargs)
    layer.experts = ScaledExperts([float(j + 2) for j in range(num_experts)])
    return layer


def test_cpu_auction_kernel_builds():
    from fairseq_base.assignment import _cpu_kernel
    assert _cpu_kernel() is not None  # else training on CPU falls back to the slower PyTorch auction


def test_dispatch_returns_every_token_from_its_expert():
    dispatcher = TokenDispatcher(num_experts=4)
    tokens = torch.randn(10, 3)
    expert_ids = torch.tensor([3, 0, 3, 1, 3, 0, 1, 3, 3, 0])  # expert 2 gets nothing
    expert_in, per_expert, state = dispatcher.dispatch(tokens, expert_ids)
    assert per_expert == [3, 2, 0, 5]
    factors = torch.repeat_interleave(torch.tensor([2.0, 3.0, 4.0, 5.0]), torch.tensor(per_expert))
    out = dispatcher.combine(expert_in * factors[:, None], state)
    assert torch.allclose(out, tokens * (expert_ids + 2).float()[:, None])


def test_dispatcher_refuses_uneven_split():
    with pytest.raises(ValueError):
        TokenDispatcher(num_experts=0)


@pytest.mark.parametrize("training", [True, False])
def test_gate_and_expert_formula(training):
    torch.manual_seed(0)
    layer = scaled_identity_layer(4).train(training)
    x = torch.randn(5, 3, 8)
    out, attn, extra = layer(x)
    assert out.shape == x.shape and attn is None and extra is None
    h = x.reshape(-1, 8)
    scores = h @ layer.centroids.t()
    if training:
        from fairseq_base.assignment import balanced_assignment
        ids = balanced_assignment(scores)
    else:
        ids = scores.argmax(1)
    gate = torch.sigmoid(scores.gather(1, ids[:, None]))
    expected = gate * (ids + 2).float()[:, None] * h + (1 - gate) * h
    assert torch.allclose(out.reshape(-1, 8), expected, atol=1e-6)


def test_balanced_in_training_greedy_in_eval():
    torch.manual_seed(1)
    layer = BaseLayer(8, 16, num_experts=4)
    with torch.no_grad():
        layer.centroids.copy_(torch.eye(4, 8))
    # Every token prefers expert 0: greedy sends all there, balanced spreads them evenly.
    x = torch.randn(64, 1, 8).abs() * 0.1
    x[..., 0] += 5.0
    seen = {}
    run_experts = layer.experts.forward

    def spy(tokens, per_expert):
        seen["per_expert"] = per_expert
        return run_experts(tokens, per_expert)

    layer.experts.forward = spy
    layer.train()(x)
    assert seen["per_expert"] == [16, 16, 16, 16]
    layer.eval()(x)
    assert seen["per_expert"] == [64, 0, 0, 0]
    layer.eval_routing = "balanced"
    layer(x)
    assert seen["per_expert"] == [16, 16, 16, 16]


def test_gradients_reach_input_centroids_and_experts():
    torch.manual_seed(2)
    layer = BaseLayer(8, 16, num_experts=3, num_sublayers=2).train()
    # ff2 starts at zero, so give it weights for the first-layer gradients to flow through.
    for p in layer.experts.parameters():
        nn.init.normal_(p, std=0.1)
    x = torch.randn(7, 2, 8, requires_grad=True)
    out, _, _ = layer(x)
    out.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer.centroids.grad.abs().sum() > 0
    for name, p in layer.experts.named_parameters():
        assert p.grad is not None, name
        assert getattr(p, "expert", False), name
    assert not getattr(layer.centroids, "expert", False)  # centroids are shared
    used = [j for j in range(3) if layer.experts.sublayers[0].ff1_weight.grad[j].abs().sum() > 0]
    assert used == [0, 1, 2]


def test_new_expert_is_identity_and_layer_is_identity_at_init():
    layer = BaseLayer(8, 16, num_experts=2)
    x = torch.randn(4, 3, 8)
    assert torch.allclose(layer(x)[0], x, atol=1e-6)


def test_layer_logs_routing_stats_at_the_optimizer_step():
    from fairseq import metrics
    layer = BaseLayer(8, 16, num_experts=4, name="base7").train()
    with metrics.aggregate(new_root=True) as agg:
        layer(torch.randn(32, 1, 8))
        assert "base7_top1" not in agg.get_smoothed_values()  # counted in the forward, logged at the step
        reduce_routing_stats(layer)
    values = agg.get_smoothed_values()
    assert 0.0 <= values["base7_top1"] <= 1.0
    assert values["base7_load_max"] == 1.0  # balanced in training


def test_empty_batch():
    layer = BaseLayer(8, 16, num_experts=4).train()
    out, _, _ = layer(torch.randn(0, 2, 8))
    assert out.shape == (0, 2, 8)


@pytest.mark.parametrize("layers,base,expected", [
    (24, 3, [6, 12, 18]), (24, 1, [12]), (12, 1, [6]), (24, 2, [8, 16]), (2, 1, [1]), (1, 1, [0]),
])
def test_paper_placement(layers, base, expected):
    assert paper_positions(layers, base) == expected
    assert base_layer_positions(layers, base) == expected


def test_explicit_positions():
    assert base_layer_positions(24, 1, "L") == [24]
    assert base_layer_positions(24, 2, "18, 6") == [6, 18]
    assert base_layer_positions(4, 0, "") == []


@pytest.mark.parametrize("spec,count,match", [
    ("25", 1, "out of range"), ("-1", 1, "out of range"), ("6,6", 2, "repeats"),
    ("6", 2, "lists 1 positions"), ("six", 1, "not a comma-separated"),
])
def test_bad_positions(spec, count, match):
    with pytest.raises(BaseLayerConfigError, match=match):
        base_layer_positions(24, count, spec)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("router", ["balanced", "sbase", "switch", "top2", "lossfree"])
def test_routing_scores_are_float32_in_a_half_precision_model(dtype, router):
    """Two centroids whose scores differ by less than half a bf16/fp16 step at 8: in the model's
    dtype the products tie (and argmax takes expert 0); in float32 expert 1 wins."""
    layer = BaseLayer(2, 4, num_experts=2, router=router).eval().to(dtype)
    with torch.no_grad():
        layer.centroids.copy_(torch.tensor([[1.0, 0.0], [1.0, 1 / 512]]))
    tokens = torch.tensor([[8.0, 1.0]], dtype=dtype)
    assert (tokens @ layer.centroids.t()).diff().item() == 0  # the rounding that float32 avoids
    scores = layer._scores(tokens)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, tokens.float() @ layer.centroids.float().t())
    routing, routed_scores = layer.route(tokens)
    assert routing.expert_ids[0, 0].item() == 1
    assert routing.gates.dtype == torch.float32 and routed_scores.dtype == torch.float32
    out, _, _ = layer(tokens[None])
    assert out.dtype == dtype  # only routing is in float32; the layer's output keeps the model's dtype


@pytest.mark.parametrize("router", ["balanced", "sbase", "switch", "top2", "lossfree"])
def test_routing_scores_are_float32_under_autocast(router):
    """fairseq's --amp runs the forward under autocast, which recasts matmuls to half precision
    even after .float(); on CPU, bf16 autocast shows the same. Scores stay float32 and route
    every token as without autocast: here the tie of the test above, and 512 random tokens."""
    layer = BaseLayer(2, 4, num_experts=2, router=router).eval()
    with torch.no_grad():
        layer.centroids.copy_(torch.tensor([[1.0, 0.0], [1.0, 1 / 512]]))
    tie = torch.tensor([[8.0, 1.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (tie @ layer.centroids.t()).diff().item() == 0  # what autocast does to a plain product
        scores, (routing, _) = layer._scores(tie), layer.route(tie)
    assert scores.dtype == torch.float32 and routing.expert_ids[0, 0].item() == 1
    torch.manual_seed(5)
    wide = BaseLayer(16, 32, num_experts=4, router=router).eval()
    tokens = torch.randn(512, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = wide.route(tokens)[0].expert_ids
    assert torch.equal(under_autocast, wide.route(tokens)[0].expert_ids)


def test_sinkhorn_routes_half_precision_scores_in_float32():
    from fairseq_base.assignment import sinkhorn_assignment
    scores = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float16, torch.bfloat16):
        half = scores.to(dtype)
        assert torch.equal(sinkhorn_assignment(half), sinkhorn_assignment(half.float()))


def test_experts_start_from_their_global_id_and_the_seed():
    from fairseq_base.experts import LocalExperts
    torch.manual_seed(11)
    one = BaseLayer(8, 16, num_experts=4)
    first_layers = [one.experts.sublayers[0].ff1_weight[j] for j in range(4)]
    for i in range(4):
        for j in range(i):
            assert not torch.equal(first_layers[i], first_layers[j])  # no two experts start equal
    torch.manual_seed(12)
    assert not torch.equal(BaseLayer(8, 16, num_experts=4).experts.sublayers[0].ff1_weight[0], first_layers[0])
    # What a worker holding experts 2 and 3 builds: the same two experts.
    everything, last_two = LocalExperts(range(4), 8, 16, 2, seed=5), LocalExperts(range(2, 4), 8, 16, 2, seed=5)
    for j in range(2):
        mine, theirs = expert_weights(last_two, j), expert_weights(everything, 2 + j)
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), name


def test_the_installed_kernel_solves_in_a_fresh_process_without_compiling(tmp_path):
    """pip install (scripts/setup.sh) compiles the kernel: a new process with an empty extension
    cache uses it, compiles nothing and says nothing about compiling."""
    import subprocess
    import sys
    cache = tmp_path / "torch_extensions"
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO); "
            "from fairseq_base import assignment; assignment.balanced_assignment(torch.randn(12, 3)); "
            "print('kernel:', assignment._cpu_kernel().__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(cache)},
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernel: fairseq_base._auction" in result.stdout, (result.stdout, result.stderr[-3000:])
    assert "compiled" not in result.stderr and not (cache.exists() and any(cache.iterdir()))


@pytest.mark.slow
def test_compiling_at_first_use_says_so_in_one_line(monkeypatch, caplog):
    """A checkout used without installing it compiles the kernel at its first use, saying so."""
    import logging
    import sys
    from fairseq_base import assignment
    monkeypatch.setattr(assignment, "_KERNEL", {})
    import fairseq_base
    for build in {name for names in assignment.KERNEL_VARIANTS.values() for name in names}:  # as if not installed
        monkeypatch.setitem(sys.modules, f"fairseq_base.{build}", None)
        monkeypatch.delattr(fairseq_base, build, raising=False)
    with caplog.at_level(logging.INFO, logger="fairseq_base.assignment"):
        assert assignment._cpu_kernel() is not None
    lines = [r.getMessage() for r in caplog.records if "kernel" in r.getMessage()]
    assert len(lines) == 1 and "compiled, which takes about 30 s" in lines[0]

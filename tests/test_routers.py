"""Baseline routers (sbase, switch, top2, hash, lossfree): routing rules, capacity, balance loss, the
lossfree bias, statistics, training."""

import math
import re

import pytest
import torch
from torch import nn

from fairseq_base.assignment import balanced_assignment, greedy_assignment, sinkhorn_assignment
from fairseq_base.criterions.base_cross_entropy import take_balance_loss
from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.layer import BaseLayer, update_expert_biases
from fairseq_base.reshard import reshard
from fairseq_base.router import (Routing, hash_routing, lossfree_routing, random_hash, routing_counts,
                                 stats_from_counts, switch_balance_loss, switch_routing, top2_routing,
                                 update_expert_bias, within_capacity)
from test_end_to_end import data_bin, run  # noqa: F401  (fixture)
from expert_weights import ScaledExperts
from test_torchrun import TINY_MODEL, losses, torchrun_train


def _loads(ids, num_experts):
    load = torch.bincount(ids, minlength=num_experts).float()
    return load / load.mean()


def _objective(scores, ids):
    return float(scores.gather(1, ids[:, None]).sum())


def test_sinkhorn_spreads_a_popular_expert_almost_evenly():
    scores = torch.randn(1024, 4, generator=torch.Generator().manual_seed(0)) + torch.tensor([0.7, 0, 0, 0])
    assert _loads(greedy_assignment(scores), 4).max() > 1.5  # everyone's favourite
    sinkhorn = sinkhorn_assignment(scores)
    assert (_loads(sinkhorn, 4) - 1).abs().max() < 0.1
    assert (sinkhorn == balanced_assignment(scores)).float().mean() > 0.95
    # Approximate balance is no better an optimum: the exact solver's objective is the best balanced one.
    assert _objective(scores, sinkhorn) <= _objective(scores, balanced_assignment(scores)) + 1e-3


def test_sbase_layer_routes_by_sinkhorn_in_training_and_greedily_outside():
    layer = BaseLayer(8, 16, 4, router="sbase")
    tokens = torch.randn(512, 8) + layer.centroids.detach()[0] * 20  # expert 0 is everyone's favourite
    scores = tokens @ layer.centroids.detach().t()
    routing, _ = layer.train().route(tokens)
    assert torch.equal(routing.expert_ids[:, 0], sinkhorn_assignment(scores))
    assert not torch.equal(routing.expert_ids[:, 0], balanced_assignment(scores))
    routing, _ = layer.eval().route(tokens)
    assert torch.equal(routing.expert_ids[:, 0], greedy_assignment(scores))


def test_sinkhorn_edge_cases_stop_and_stay_valid():
    assert sinkhorn_assignment(torch.empty(0, 3)).numel() == 0
    assert sinkhorn_assignment(torch.randn(5, 1)).tolist() == [0] * 5
    scores = torch.randn(64, 4)
    scores[0, 0], scores[1], scores[2] = float("nan"), float("inf"), float("-inf")
    ids = sinkhorn_assignment(scores)
    assert ids.min() >= 0 and ids.max() < 4
    # Very sharp scores converge slowly: it stops after max_iterations rather than looping on.
    assert sinkhorn_assignment(1e4 * torch.randn(256, 4), max_iterations=3).shape == (256,)


def test_switch_balance_loss_has_the_textbook_value():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    # top-1 shares f = (3/4, 1/4), mean probabilities P = (0.65, 0.35): 2 * (0.4875 + 0.0875).
    assert switch_balance_loss(probs, probs.argmax(1)).item() == pytest.approx(1.15)
    routing = switch_routing(probs.log(), capacity_factor=None)  # softmax(log p) = p
    assert routing.balance_loss.item() == pytest.approx(1.15)
    uniform = torch.full((6, 3), 1 / 3)
    assert switch_balance_loss(uniform, torch.tensor([0, 1, 2, 0, 1, 2])).item() == pytest.approx(1.0)


def test_switch_keeps_the_first_tokens_up_to_capacity():
    scores = torch.tensor([[2.0, 0.0]] * 5 + [[0.0, 1.0]])  # five tokens want expert 0
    routing = switch_routing(scores, capacity_factor=1.0)  # capacity ceil(6 / 2) = 3
    assert routing.expert_ids[:, 0].tolist() == [0, 0, 0, 0, 0, 1]
    assert routing.kept[:, 0].tolist() == [True, True, True, False, False, True]
    assert torch.allclose(routing.gates[:, 0], torch.softmax(scores, 1).max(1).values)
    assert switch_routing(scores, capacity_factor=2.0).kept.all()  # capacity 6
    assert switch_routing(scores, capacity_factor=None).kept is None  # outside training


def test_top2_first_choices_come_before_second_choices():
    scores = torch.tensor([[3.0, 2.0, 0.0], [0.0, 3.0, 2.0], [2.0, 3.0, 0.0], [0.0, 2.0, 3.0]])
    routing = top2_routing(scores, capacity_factor=1.5)  # capacity ceil(1.5 * 4 / 3) = 2 pairs
    assert routing.expert_ids.tolist() == [[0, 1], [1, 2], [1, 0], [2, 1]]
    # Expert 1 is the first choice of tokens 1 and 2, so token 0's and 3's second choices miss it.
    assert routing.kept.tolist() == [[True, False], [True, True], [True, True], [True, False]]
    top = torch.softmax(scores, 1).topk(2).values
    assert torch.allclose(routing.gates, top / top.sum(1, keepdim=True))


def test_within_capacity_counts_each_expert_separately():
    ids = torch.tensor([[1], [1], [0], [1], [0]])
    assert within_capacity(ids, 2, 2)[:, 0].tolist() == [True, True, True, False, True]


def busiest_share(expert_ids, num_experts):
    return torch.bincount(expert_ids.reshape(-1), minlength=num_experts).max().item() / expert_ids.numel()


def test_lossfree_bias_chooses_and_the_unbiased_score_gates():
    scores = torch.tensor([[2.0, 1.0], [0.0, 0.5]])
    routing = lossfree_routing(scores, torch.tensor([0.0, 1.5]))
    assert routing.expert_ids[:, 0].tolist() == [1, 1] and routing.kept is None  # nothing dropped
    assert torch.equal(routing.gates[:, 0], torch.sigmoid(torch.tensor([1.0, 0.5])))
    bias = torch.zeros(3)
    update_expert_bias(bias, torch.tensor([6.0, 2.0, 1.0]), rate=0.1)  # mean 3
    assert torch.allclose(bias, torch.tensor([-0.1, 0.1, 0.1]))
    update_expert_bias(bias, torch.zeros(3), rate=0.1)  # no tokens: no change
    assert torch.allclose(bias, torch.tensor([-0.1, 0.1, 0.1]))


def test_lossfree_busiest_experts_share_falls_toward_one_over_e():
    """A skewed problem: expert 0 is every token's favourite (greedy gives it about 85% of the
    tokens). A layer trained on it, its bias updated after every step as fairseq's optimizer
    step does, routes ever more evenly, in training and at inference alike."""
    torch.manual_seed(0)
    layer = BaseLayer(8, 16, num_experts=4, router="lossfree", bias_update_rate=0.01).train()
    model = nn.Sequential(layer)
    tokens = torch.randn(512, 1, 8) + 2 * layer.centroids.detach()[0] / layer.centroids.detach()[0].norm() ** 2
    shares = []
    for _ in range(300):
        shares.append(busiest_share(layer.route(tokens[:, 0])[0].expert_ids, 4))
        layer(tokens)
        update_expert_biases(model)
    assert shares[0] > 0.6
    assert shares[100] < shares[0] - 0.2 and max(shares[-50:]) < 0.3, shares[::25]
    assert layer.expert_bias[0] < 0 < layer.expert_bias[1:].min()
    assert busiest_share(layer.eval().route(tokens[:, 0])[0].expert_ids, 4) < 0.3
    pending = layer.pending_load.clone()
    layer(tokens)  # inference leaves the load of training alone
    assert torch.equal(layer.pending_load, pending)


def test_lossfree_bias_is_float32_and_saved_in_any_precision():
    layer = BaseLayer(8, 16, num_experts=4, router="lossfree").to(torch.bfloat16)
    assert layer.centroids.dtype == torch.bfloat16
    assert layer.expert_bias.dtype == layer.pending_load.dtype == torch.float32
    layer.expert_bias.fill_(1.0)
    update_expert_bias(layer.expert_bias, torch.tensor([0.0, 1, 1, 1]), rate=1e-3)
    assert layer.expert_bias[0].item() == pytest.approx(1.001)  # lost in bf16, whose step at 1 is 2^-7
    state = layer.state_dict()
    assert "expert_bias" in state and "pending_load" not in state
    layer.train()(torch.randn(6, 1, 8, dtype=torch.bfloat16))


@pytest.mark.slow
def test_lossfree_bias_survives_save_resume_and_reshard(data_bin, tmp_path):  # noqa: F811
    """Trained in one process 12 updates straight, or 6 then resumed to 12: the same losses and
    the same bias; fairseq-base-reshard to 2 workers carries the bias into both files."""
    def train(save_dir, updates):
        return run("fairseq-train", str(data_bin / "bin"), "--user-dir", "fairseq_base", *TINY_MODEL, "--cpu",
                   "--save-dir", str(save_dir), "--base-router", "lossfree", "--base-bias-update-rate", "0.01",
                   "--base-moe-freq", "2", "--base-experts", "4", "--max-update", str(updates), "--log-interval", "1")

    straight = losses(train(tmp_path / "straight", 12))
    train(tmp_path / "resumed", 6)
    resumed = losses(train(tmp_path / "resumed", 12))
    assert sorted(resumed) == list(range(7, 13))
    assert all(abs(resumed[u] - straight[u]) <= 1e-3 for u in resumed), (resumed, straight)
    biases = {}
    for name in ("straight", "resumed"):
        model = torch.load(tmp_path / name / "checkpoint_last.pt", weights_only=True)["model"]
        biases[name] = {k: v for k, v in model.items() if k.endswith("expert_bias")}
    assert len(biases["straight"]) == 2  # the BASE layer and the expert FFN
    for key, bias in biases["straight"].items():
        assert bias.abs().max() > 0 and torch.allclose(biases["resumed"][key], bias, atol=1e-6), key
    outputs = reshard(str(tmp_path / "straight" / "checkpoint_last.pt"), 2, str(tmp_path / "two.pt"))
    for path in outputs:
        model = torch.load(path, weights_only=True)["model"]
        for key, bias in biases["straight"].items():
            assert torch.equal(model[key], bias), (path, key)


def test_hash_is_deterministic_and_ignores_the_hidden_state():
    table = random_hash(100, 4)
    assert torch.equal(table, random_hash(100, 4))  # every worker and every run draws the same hash
    assert set(table.tolist()) == {0, 1, 2, 3}
    tokens = torch.tensor([[5, 7, 5, 99]])
    assert hash_routing(tokens, table).expert_ids[:, 0].tolist() == table[[5, 7, 5, 99]].tolist()

    layer = BaseLayer(8, 16, num_experts=4, router="hash", vocab_size=100).train()
    assert all(name.startswith("experts.") for name, _ in layer.named_parameters())  # no router parameters
    seen = []
    run_experts = layer.experts.forward
    layer.experts.forward = lambda x, per_expert: seen.append(per_expert) or run_experts(x, per_expert)
    layer.token_ids = tokens.t().contiguous()  # [B, T] for a [T, B, C] input
    for seed in (0, 1):
        layer(torch.randn(4, 1, 8, generator=torch.Generator().manual_seed(seed)) * (seed + 1))
    assert seen[0] == seen[1] == torch.bincount(table[[5, 7, 5, 99]], minlength=4).tolist()


def test_hash_layer_without_token_ids_says_so():
    layer = BaseLayer(8, 16, num_experts=2, router="hash", vocab_size=10)
    with pytest.raises(RuntimeError, match="needs the token ids"):
        layer(torch.randn(3, 1, 8))


def scaled_experts(layer):
    layer.experts = ScaledExperts([float(j + 2) for j in range(layer.num_experts)])
    return layer


def test_switch_layer_drops_overflow_tokens_to_the_residual():
    layer = scaled_experts(BaseLayer(4, 8, num_experts=2, router="switch", capacity_factor=1.0)).train()
    with torch.no_grad():
        layer.centroids.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.tensor([[3.0, 0, 1, 1]] * 5 + [[0, 3.0, 1, 1]])[:, None]  # five tokens want expert 0
    out = layer(x)[0][:, 0]
    p = torch.softmax(torch.tensor([3.0, 0.0]), 0)[0]
    kept = x[:3, 0] * (1 + p * 1)  # expert 0 maps x to 2x: x + p * (2x - x)
    assert torch.allclose(out[:3], kept)
    assert torch.equal(out[3:5], x[3:5, 0])  # over capacity: the residual alone
    assert torch.allclose(out[5], x[5, 0] * (1 + p * 2))  # expert 1 maps x to 3x
    assert torch.allclose(layer.eval()(x)[0][:5, 0], x[:5, 0] * (1 + p))  # nothing dropped outside training


def test_top2_layer_mixes_both_experts():
    torch.manual_seed(0)
    layer = scaled_experts(BaseLayer(8, 16, num_experts=3, router="top2")).eval()
    x = torch.randn(10, 2, 8)
    h = x.reshape(-1, 8)
    routing = top2_routing(h @ layer.centroids.t(), capacity_factor=None)
    factors = (routing.expert_ids + 1).float()  # expert j maps x to (j + 2) x: update (j + 1) x
    expected = h * (1 + (routing.gates * factors).sum(1, keepdim=True))
    assert torch.allclose(layer(x)[0].reshape(-1, 8), expected, atol=1e-6)


def routing_stats(routing, scores, num_experts):
    return stats_from_counts(routing_counts(routing, scores, num_experts), num_experts)


def test_routing_stats_on_a_hand_made_example():
    scores = torch.zeros(4, 2)  # uniform: entropy log 2
    routing = Routing(torch.tensor([[0], [0], [0], [1]]), torch.ones(4, 1),
                      torch.tensor([[True], [True], [False], [True]]))
    stats = routing_stats(routing, scores, num_experts=2)
    assert stats["load_max"].item() == pytest.approx(1.5) and stats["load_min"].item() == pytest.approx(0.5)
    assert stats["dropped"].item() == pytest.approx(0.25)
    assert stats["entropy"].item() == pytest.approx(math.log(2))
    assert stats["top1"].item() == pytest.approx(0.5)  # argmax of ties is expert 0: tokens 0 and 1
    hashed = routing_stats(Routing(torch.tensor([[1], [1]]), torch.ones(2, 1)), None, num_experts=2)
    assert hashed["top1"] == 1 and hashed["entropy"] == 0 and hashed["load_min"] == 0


def test_balance_loss_reaches_the_criterion_and_the_centroids():
    layer = BaseLayer(8, 16, num_experts=4, router="switch", balance_loss_weight=0.01).train()
    layer(torch.randn(16, 1, 8))
    loss = take_balance_loss(nn.Sequential(layer))
    assert layer.balance_loss is None and loss.item() >= 0.01 - 1e-6  # E * sum f P >= 1
    loss.backward()
    assert layer.centroids.grad.abs().sum() > 0


def test_balance_loss_without_the_criterion_is_refused():
    layer = BaseLayer(8, 16, num_experts=4, router="top2", balance_loss_weight=0.01).train()
    layer(torch.randn(16, 1, 8))
    with pytest.raises(BaseLayerConfigError, match="--criterion base_cross_entropy"):
        layer(torch.randn(16, 1, 8))  # nobody took the first loss


def test_expert_ffn_layer_is_fairseqs_ffn_block_when_routing_is_trivial(data_bin):  # noqa: F811
    """With one expert and gate 1 (hash), an expert FFN computes what fairseq's FFN block does."""
    from fairseq import checkpoint_utils, options, tasks

    from fairseq_base.models.transformer_lm_base import ExpertFeedForwardLayer

    def build(*flags):
        parser = options.get_training_parser()
        args = options.parse_args_and_arch(parser, [str(data_bin / "bin"), "--user-dir", "fairseq_base",
                                                    *TINY_MODEL, "--cpu", "--base-layers", "0", *flags])
        cfg = checkpoint_utils.convert_namespace_to_omegaconf(args)
        return tasks.setup_task(cfg.task).build_model(cfg.model).eval()

    model = build("--base-moe-freq", "2", "--base-router", "hash", "--base-experts", "1")
    moe_layer, reference = model.decoder.layers[1], build().decoder.layers[1]
    assert isinstance(moe_layer, ExpertFeedForwardLayer)
    assert not isinstance(model.decoder.layers[0], ExpertFeedForwardLayer)
    expert = moe_layer.moe.experts.sublayers[0]
    with torch.no_grad():
        for name, param in moe_layer.attention.named_parameters():
            param.copy_(reference.get_parameter(name))
        for ours, theirs in (("norm", "final_layer_norm"), ("ff1", "fc1"), ("ff2", "fc2")):
            for param in ("weight", "bias"):  # the projections' weights are [in, out]: nn.Linear's transposed
                value = getattr(getattr(reference, theirs), param)
                getattr(expert, f"{ours}_{param}")[0] = value.t() if ours != "norm" and param == "weight" else value
    tokens = torch.randint(4, 20, (2, 6))
    x = torch.randn(6, 2, 32)
    moe_layer.moe.token_ids = tokens
    assert torch.allclose(moe_layer(x)[0], reference(x)[0], atol=1e-5)


@pytest.mark.parametrize("option,value,match", [
    ("--base-capacity-factor", "1.5", "applies to --base-router switch or top2"),
    ("--base-moe-freq", "-1", "--base-moe-freq must be >= 0"),
])
def test_bad_router_options_are_refused(data_bin, tmp_path, option, value, match):  # noqa: F811
    result = run("fairseq-train", str(data_bin / "bin"), "--user-dir", "fairseq_base", *TINY_MODEL, "--cpu",
                 "--save-dir", str(tmp_path), option, value, "--max-update", "1", check=False)
    assert result.returncode != 0
    assert re.search(f"fairseq_base: error: .*{re.escape(match)}", result.stderr), result.stderr[-2000:]


ROUTER_RUN = ["--base-layers", "1", "--base-moe-freq", "2", "--base-experts", "4",
              "--criterion", "base_cross_entropy"]


@pytest.mark.parametrize("router", ["lossfree"] + [pytest.param(router, marks=pytest.mark.slow)
                                                  for router in ("switch", "sbase", "top2", "hash")])
def test_router_trains_in_one_process_and_logs_its_statistics(data_bin, tmp_path, router):  # noqa: F811
    result = run("fairseq-train", str(data_bin / "bin"), "--user-dir", "fairseq_base", *TINY_MODEL, "--cpu",
                 "--save-dir", str(tmp_path), "--base-router", router, *ROUTER_RUN, "--max-update", "30",
                 "--log-interval", "5", "--validate-interval-updates", "15", "--max-valid-steps", "2",
                 "--tensorboard-logdir", str(tmp_path / "tb"))
    log = result.stdout + result.stderr
    curve = losses(result)
    assert curve[30] < curve[5] - 0.3, curve
    train = [line for line in log.splitlines() if "| train_inner |" in line][-1]
    first_valid, valid = [line for line in log.splitlines() if "valid on 'valid' subset" in line]
    for layer in ("base1", "moe1"):
        for stat in ("top1", "load_max", "load_min", "dropped", "entropy"):
            assert f"{layer}_{stat}=" in train and f"{layer}_{stat} " in valid, (layer, stat)
        # Churn since the previous validation: from the second one on.
        assert f"{layer}_churn" not in first_valid
        churn = float(re.search(rf"{layer}_churn ([0-9.]+)", valid).group(1))
        assert churn == 0 if router == "hash" else 0 <= churn <= 1  # hash: a token's expert never changes
    assert ("balance_loss" in train) == (router in ("switch", "top2"))
    assert re.search(r"moe1_dropped 0 ", valid)  # nothing dropped outside training
    events = b"".join(p.read_bytes() for p in (tmp_path / "tb").rglob("events*"))
    assert b"moe1_entropy" in events and b"base1_load_min" in events and b"base1_churn" in events
    run("fairseq-eval-lm", str(data_bin / "bin"), "--user-dir", "fairseq_base", "--path",
        str(tmp_path / "checkpoint_last.pt"), "--cpu", "--tokens-per-sample", "64", "--max-valid-steps", "2",
        "--gen-subset", "valid")


# Expert FFNs only (per-rank files that fairseq alone would not write), under both DDP backends.
@pytest.mark.slow
@pytest.mark.parametrize("router,base_layers,backend", [("switch", 0, "legacy_ddp"), ("hash", 0, "c10d")])
def test_router_trains_on_two_gloo_workers(data_bin, tmp_path, router, base_layers, backend):  # noqa: F811
    flags = ["--base-router", router, *ROUTER_RUN, "--base-layers", str(base_layers), "--ddp-backend", backend,
             "--log-interval", "5"]
    curve = losses(torchrun_train(2, data_bin, tmp_path, *flags, "--max-update", "30"))
    assert curve[30] < curve[5] - 0.3, curve
    # Per-rank checkpoints also without BASE layers (fairseq keys them on --base-layers > 0).
    shards = [torch.load(tmp_path / f"checkpoint_last-rank-{r}.pt", weights_only=False)["model"] for r in (0, 1)]
    ids_keys = [k for k in shards[0] if k.endswith("expert_ids")]
    assert len(ids_keys) == 1 + base_layers  # the expert FFN of layer 2 (and the BASE layer)
    for key in ids_keys:
        assert shards[0][key].tolist() == [0, 1] and shards[1][key].tolist() == [2, 3]
    shared = [k for k in shards[0] if ".experts." not in k and not k.endswith("expert_ids")]
    assert all(torch.equal(shards[0][k], shards[1][k]) for k in shared)
    resumed = losses(torchrun_train(2, data_bin, tmp_path, *flags, "--max-update", "35"))
    assert sorted(resumed) == [35]  # went on from update 30
    # One file for one process, scored by fairseq-eval-lm.
    run("fairseq-base-reshard", str(tmp_path / "checkpoint_last-rank-0.pt"), "--world-size", "1",
        "--out", str(tmp_path / "one" / "model.pt"))
    result = run("fairseq-eval-lm", str(data_bin / "bin"), "--user-dir", "fairseq_base", "--path",
                 str(tmp_path / "one" / "model.pt"), "--cpu", "--tokens-per-sample", "64", "--gen-subset", "valid",
                 "--max-valid-steps", "2")
    assert re.search(r"Perplexity: [0-9.]+", result.stdout + result.stderr)

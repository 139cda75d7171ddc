"""Baseline routers (sbase, switch, top2, hash, lossfree): routing rules, capacity, balance loss, the
lossfree bias, statistics, training."""

import math
import re
import shutil

import pytest
import torch
from torch import nn

from fairseq_base.assignment import balanced_assignment, greedy_assignment, sinkhorn_assignment
from fairseq_base.criterions.base_cross_entropy import take_balance_loss
from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.experts import EXPERT_IDS
from fairseq_base.layer import BaseLayer, reduce_routing_stats
from fairseq_base.reshard import reshard
from fairseq_base.router import (ROUTER, ROUTER_RECORDS, Routing, balanced_hash, hash_routing, lossfree_routing,
                                 random_hash, routing_counts, stats_from_counts, switch_balance_loss, switch_routing,
                                 top2_routing, update_expert_bias, within_capacity)
from fairseq_runs import ROUTER_RUN, TINY_MODEL, losses, router_run_command, run, torchrun_train
from expert_weights import ScaledExperts


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
    # The gates are renormalised over the pairs kept (fairseq's top2gating): a token whose second
    # pair was dropped puts its whole weight on the first.
    top = torch.softmax(scores, 1).topk(2).values
    assert torch.allclose(routing.gates[[1, 2]], top[[1, 2]] / top[[1, 2]].sum(1, keepdim=True))
    assert routing.gates[[0, 3]].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    outside_training = top2_routing(scores, capacity_factor=None)
    assert outside_training.kept is None and torch.allclose(outside_training.gates, top / top.sum(1, keepdim=True))


def test_within_capacity_counts_each_expert_separately():
    ids = torch.tensor([[1], [1], [0], [1], [0]])
    assert within_capacity(ids, 2, 2)[:, 0].tolist() == [True, True, True, False, True]


def busiest_share(expert_ids, num_experts):
    return torch.bincount(expert_ids.reshape(-1), minlength=num_experts).max().item() / expert_ids.numel()


def test_lossfree_bias_chooses_and_the_unbiased_score_gates():
    scores = torch.tensor([[2.0, 1.0], [0.0, 0.5]])
    routing = lossfree_routing(scores, torch.tensor([0.0, 0.2]))  # sigmoids 0.88, 0.73 and 0.5, 0.62
    assert routing.expert_ids[:, 0].tolist() == [1, 1] and routing.kept is None  # nothing dropped
    assert torch.equal(routing.gates[:, 0], torch.sigmoid(torch.tensor([1.0, 0.5])))
    bias = torch.zeros(3)
    update_expert_bias(bias, torch.tensor([6.0, 2.0, 1.0]), rate=0.1)  # mean 3
    assert torch.allclose(bias, torch.tensor([-0.1, 0.1, 0.1]))
    update_expert_bias(bias, torch.zeros(3), rate=0.1)  # no tokens: no change
    assert torch.allclose(bias, torch.tensor([-0.1, 0.1, 0.1]))


def test_lossfree_busiest_experts_share_falls_toward_one_over_e():
    """A skewed problem: expert 0 is every token's favourite (greedy gives it most of the
    tokens). A layer trained on it, its bias updated after every step as fairseq's optimizer
    step does, routes ever more evenly, in training and at inference alike."""
    torch.manual_seed(0)
    layer = BaseLayer(8, 16, num_experts=4, router="lossfree", bias_update_rate=0.01).train()
    with torch.no_grad():  # scores of about unit spread, as in training (the initial gain is 0.1)
        layer.centroids.copy_(nn.init.orthogonal_(torch.empty(4, 8)))
    model = nn.Sequential(layer)
    tokens = torch.randn(512, 1, 8) + 2 * layer.centroids.detach()[0]
    shares = []
    for _ in range(300):
        shares.append(busiest_share(layer.route(tokens[:, 0])[0].expert_ids, 4))
        layer(tokens)
        reduce_routing_stats(model)
    assert shares[0] > 0.6
    assert shares[100] < shares[0] - 0.2 and max(shares[-50:]) < 0.35, shares[::25]


def steps_to_balance(scores, bias_on_affinity, rate=1e-3, max_steps=6000):
    """Bias updates (DeepSeek-V3's rate) until the busiest expert has at most 1.2 / E of the tokens."""
    num_experts = scores.size(1)
    bias = torch.zeros(num_experts)
    for step in range(max_steps):
        ids = lossfree_routing(scores, bias, bias_on_affinity).expert_ids
        if busiest_share(ids, num_experts) <= 1.2 / num_experts:
            return step
        update_expert_bias(bias, torch.bincount(ids[:, 0], minlength=num_experts).float(), rate)
    return max_steps


def test_lossfree_bias_on_the_sigmoid_balances_scores_of_trained_scale_sooner():
    """Scores of the scale seen in training (|s| around 3, one expert favoured by 3): a bias
    step of 1e-3 closes gaps of a few units in thousands of steps on the raw score, and gaps of
    the sigmoid's (0, 1) in hundreds. The rule that runs is the sigmoid's."""
    generator = torch.Generator().manual_seed(0)
    scores = 1.5 * torch.randn(2048, 8, generator=generator)
    scores[:, 0] += 3.0
    on_sigmoid, on_score = steps_to_balance(scores, True), steps_to_balance(scores, False)
    assert on_sigmoid < on_score / 3, (on_sigmoid, on_score)
    bias = torch.zeros(8)
    bias[0] = -0.5  # moves sigmoid(s) by half its range, a raw score of about 3 by a sixth
    assert torch.equal(lossfree_routing(scores, bias).expert_ids,
                       (torch.sigmoid(scores) + bias).argmax(1, keepdim=True))
    assert not torch.equal(lossfree_routing(scores, bias).expert_ids, (scores + bias).argmax(1, keepdim=True))


def test_lossfree_bias_is_float32_and_saved_in_any_precision():
    layer = BaseLayer(8, 16, num_experts=4, router="lossfree").to(torch.bfloat16)
    assert layer.centroids.dtype == torch.bfloat16
    assert layer.expert_bias.dtype == layer.stats.step_counts.dtype == torch.float32
    layer.expert_bias.fill_(1.0)
    update_expert_bias(layer.expert_bias, torch.tensor([0.0, 1, 1, 1]), rate=1e-3)
    assert layer.expert_bias[0].item() == pytest.approx(1.001)  # lost in bf16, whose step at 1 is 2^-7
    state = layer.state_dict()
    assert "expert_bias" in state and "step_counts" not in state
    layer.train()(torch.randn(6, 1, 8, dtype=torch.bfloat16))


@pytest.mark.slow
def test_lossfree_bias_survives_save_resume_and_reshard(data_bin, router_runs, tmp_path):
    """lossfree's shared run (``router_runs``: 30 updates straight) against the same run resumed
    from its save at update 15: the same losses and the same bias; fairseq-base-reshard to 2
    workers carries the bias into both files."""
    straight_dir, result = router_runs("lossfree")
    straight = losses(result)
    (tmp_path / "resumed").mkdir()
    shutil.copy(straight_dir / "checkpoint_1_15.pt", tmp_path / "resumed" / "checkpoint_last.pt")
    resumed = losses(run(*router_run_command(data_bin, "lossfree", tmp_path / "resumed")))
    assert sorted(resumed) == [20, 25, 30]
    assert all(abs(resumed[u] - straight[u]) <= 1e-3 for u in resumed), (resumed, straight)
    biases = {}
    for save_dir in (straight_dir, tmp_path / "resumed"):
        model = torch.load(save_dir / "checkpoint_last.pt", weights_only=True)["model"]
        biases[save_dir] = {k: v for k, v in model.items() if k.endswith("expert_bias")}
    assert len(biases[straight_dir]) == 2  # the BASE layer and the expert FFN
    for key, bias in biases[straight_dir].items():
        assert bias.abs().max() > 0 and torch.allclose(biases[tmp_path / "resumed"][key], bias, atol=1e-6), key
    outputs = reshard(str(straight_dir / "checkpoint_last.pt"), 2, str(tmp_path / "two.pt"))
    for path in outputs:
        model = torch.load(path, weights_only=True)["model"]
        for key, bias in biases[straight_dir].items():
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


def test_the_balance_loss_is_the_mean_over_the_expert_layers_as_fairseqs_moe_criterion():
    layers = [BaseLayer(8, 16, num_experts=4, router=router, balance_loss_weight=0.01).train()
              for router in ("switch", "top2")]
    for layer in layers:
        layer(torch.randn(16, 1, 8))
    each = [layer.balance_loss.item() for layer in layers]
    assert take_balance_loss(nn.Sequential(*layers)).item() == pytest.approx(sum(each) / 2)


@pytest.mark.parametrize("router", [record.name for record in ROUTER_RECORDS if record.reads_scores])
def test_every_routers_centroids_start_as_base_layers(router):
    """Orthogonal with gain 0.1, as fairseq's base_layer.py, for every router alike (fairseq's MoE
    gates start from nn.Linear's draws): the routers then differ in their rule alone."""
    centroids = BaseLayer(16, 32, num_experts=4, router=router).centroids.detach()
    assert torch.allclose(centroids @ centroids.t(), 0.01 * torch.eye(4), atol=1e-6)


def test_balance_loss_without_the_criterion_is_refused():
    layer = BaseLayer(8, 16, num_experts=4, router="top2", balance_loss_weight=0.01).train()
    layer(torch.randn(16, 1, 8))
    with pytest.raises(BaseLayerConfigError, match="--criterion base_cross_entropy"):
        layer(torch.randn(16, 1, 8))  # nobody took the first loss


def parse(data_bin, *flags):
    """fairseq-train's options for TINY_MODEL without BASE layers, plus ``flags``."""
    from fairseq import options
    return options.parse_args_and_arch(options.get_training_parser(),
                                       [str(data_bin / "bin"), "--user-dir", "fairseq_base", *TINY_MODEL, "--cpu",
                                        "--base-layers", "0", *flags])


def build(data_bin, *flags):
    """The model fairseq-train would build from ``flags`` (see ``parse``), in eval mode."""
    from fairseq import checkpoint_utils, tasks
    cfg = checkpoint_utils.convert_namespace_to_omegaconf(parse(data_bin, *flags))
    return tasks.setup_task(cfg.task).build_model(cfg.model).eval()


def test_expert_ffn_layer_is_fairseqs_ffn_block_when_routing_is_trivial(data_bin):
    """With one expert and gate 1 (hash), an expert FFN computes what fairseq's FFN block does."""
    from fairseq_base.models.transformer_lm_base import ExpertFeedForwardLayer

    model = build(data_bin, "--base-moe-freq", "2", "--base-router", "hash", "--base-experts", "1")
    moe_layer, reference = model.decoder.layers[1], build(data_bin).decoder.layers[1]
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


def test_routers_in_feed_forward_slots_score_the_normalised_input_and_base_layers_raw_h(data_bin):
    """As fairseq's MoE gates, DeepSeek-V3 and torchtitan route the FFN's normalised input; as
    fairseq's base_layer.py, a stand-alone BASE layer routes raw h."""
    model = build(data_bin, "--base-layers", "1", "--base-moe-freq", "2", "--base-router", "switch",
                  "--base-experts", "2")
    base, moe_layer = model.decoder.layers[1], model.decoder.layers[2]
    assert isinstance(base, BaseLayer) and base.score_norm is None
    assert isinstance(moe_layer.moe.score_norm, nn.LayerNorm)
    assert isinstance(moe_layer.attention.final_layer_norm, nn.Identity)  # moved, not run twice
    x = torch.randn(12, 32) * 40  # the residual stream's norm grows in training
    expected = torch.layer_norm(x, (32,), moe_layer.moe.score_norm.weight, moe_layer.moe.score_norm.bias) \
        @ moe_layer.moe.centroids.t()
    assert torch.allclose(moe_layer.moe._scores(x), expected, atol=1e-5)
    assert torch.allclose(base._scores(x), x @ base.centroids.t(), atol=1e-4)


@pytest.mark.parametrize("router", [record.name for record in ROUTER_RECORDS])
def test_reshard_tells_parameters_from_buffers_for_every_router(data_bin, router):
    """fairseq's optimizer state follows model.parameters(); reshard reads it from state-dict names
    alone, so every buffer a router saves must be known as one."""
    from fairseq_base.optimizer_state import parameter_names
    model = build(data_bin, "--base-layers", "1", "--base-moe-freq", "2", "--base-router", router,
                  "--base-experts", "4")
    assert parameter_names(model.state_dict()) == [name for name, _ in model.named_parameters()]


def test_checkpoints_written_before_route_as_they_were_trained(data_bin, caplog):
    """A lossfree expert FFN saved before: no score_norm (it scored raw x) and no bias_on_affinity
    (its bias was added to the raw score). Loaded now, it routes as it did."""
    flags = ("--base-moe-freq", "2", "--base-router", "lossfree", "--base-experts", "4")
    state = build(data_bin, *flags).state_dict()
    old = {key: value for key, value in state.items() if ".score_norm." not in key and "bias_on_affinity" not in key}
    old["decoder.layers.1.moe.expert_bias"] = torch.tensor([0.0, 3.0, 0.0, -3.0])
    model = build(data_bin, *flags)
    with caplog.at_level("INFO"):
        model.load_state_dict(old, strict=True)
    moe = model.decoder.layers[1].moe
    assert moe.score_norm is None and not bool(moe.bias_on_affinity)
    assert "routes as it was trained: on the raw residual stream" in caplog.text
    assert "routes as it was trained: lossfree's bias on the raw score" in caplog.text
    x = torch.randn(64, 32) * 3
    raw = x @ moe.centroids.t()
    assert torch.equal(moe.route(x)[0].expert_ids[:, 0], (raw + moe.expert_bias).argmax(1))
    # A checkpoint written now keeps the new rules.
    again = build(data_bin, *flags)
    again.load_state_dict(model.state_dict(), strict=True)
    assert again.decoder.layers[1].moe.score_norm is None and not bool(again.decoder.layers[1].moe.bias_on_affinity)
    current = build(data_bin, *flags)
    current.load_state_dict(state, strict=True)
    assert current.decoder.layers[1].moe.score_norm is not None and bool(current.decoder.layers[1].moe.bias_on_affinity)


def test_top2_samples_its_second_expert_in_training_as_fairseqs_moe_gate():
    """fairseq's top2gating with its default policy ("sampling"): the second expert is the argmax of
    the other experts' logits plus Gumbel noise, i.e. drawn from their softmax."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(20000, 1)
    torch.manual_seed(0)
    sampled = top2_routing(logits, capacity_factor=None, sample_second=True)
    assert (sampled.expert_ids[:, 0] == 0).all()
    second = torch.bincount(sampled.expert_ids[:, 1], minlength=4).float() / 20000
    assert second[0] == 0 and torch.allclose(second[1:], probs[1:] / probs[1:].sum(), atol=0.015), second
    chosen = probs[sampled.expert_ids]
    assert torch.allclose(sampled.gates, chosen / chosen.sum(1, keepdim=True))
    assert (top2_routing(logits, capacity_factor=None).expert_ids[:, 1] == 1).all()  # greedy: the runner-up


def test_top2_layer_samples_in_training_only_and_greedy_is_kept_as_an_option():
    torch.manual_seed(0)
    tokens = torch.randn(256, 8)
    sampled = BaseLayer(8, 16, num_experts=4, router="top2")
    greedy = BaseLayer(8, 16, num_experts=4, router="top2", top2_second="greedy")
    greedy.load_state_dict(sampled.state_dict())
    runner_up = (tokens @ sampled.centroids.t()).topk(2).indices[:, 1]
    first, second = (sampled.train().route(tokens)[0].expert_ids[:, 1] for _ in range(2))
    assert not torch.equal(first, second)
    assert torch.equal(sampled.eval().route(tokens)[0].expert_ids[:, 1], runner_up)  # inference: deterministic
    assert torch.equal(greedy.train().route(tokens)[0].expert_ids[:, 1], runner_up)


def test_balanced_hash_gives_every_expert_about_the_same_count():
    counts = [int(100000 / rank) for rank in range(1, 2001)]  # Zipf, as a dictionary's
    table = balanced_hash(counts, 8)
    totals = torch.zeros(8).index_add_(0, table, torch.tensor(counts, dtype=torch.float))
    assert totals.max() / totals.mean() < 1.01
    random_totals = torch.zeros(8).index_add_(0, random_hash(2000, 8), torch.tensor(counts, dtype=torch.float))
    assert random_totals.max() / random_totals.mean() > 1.05
    assert torch.equal(balanced_hash(counts, 8), table)  # the same on every worker
    # The most frequent tokens first, each to the expert with the smallest total (ties: the lower one).
    assert balanced_hash([5, 9, 4, 4], 2).tolist() == [1, 0, 1, 0]  # totals 9, 5; 9, 9; then a tie


def test_base_hash_balanced_builds_the_table_from_the_dictionarys_counts(data_bin):
    from fairseq.data import Dictionary
    model = build(data_bin, "--base-layers", "1", "--base-router", "hash", "--base-hash", "balanced",
                  "--base-experts", "4")
    counts = Dictionary.load(str(data_bin / "bin" / "dict.txt")).count
    assert torch.equal(model.decoder.layers[1].hash_table, balanced_hash(counts, 4))
    assert torch.equal(build(data_bin, "--base-layers", "1", "--base-router", "hash", "--base-experts",
                             "4").decoder.layers[1].hash_table, random_hash(len(counts), 4))


def test_decoder_normalize_before_means_what_it_says(data_bin):
    """fairseq turns a bool option whose default is True into a store_false flag: transformer_lm's
    --decoder-normalize-before turned pre-LayerNorm off for transformer_lm_base."""
    assert getattr(parse(data_bin), "decoder_normalize_before", True) is True
    assert parse(data_bin, "--decoder-normalize-before").decoder_normalize_before is True
    assert parse(data_bin, "--no-decoder-normalize-before").decoder_normalize_before is False
    assert build(data_bin, "--decoder-normalize-before").decoder.layers[0].normalize_before
    assert not build(data_bin, "--no-decoder-normalize-before").decoder.layers[0].normalize_before


@pytest.mark.slow
@pytest.mark.parametrize("option,value,match", [
    ("--base-capacity-factor", "1.5", "applies to --base-router switch or top2"),
    ("--base-moe-freq", "-1", "--base-moe-freq must be >= 0"),
    ("--base-moe-freq", "2 --no-decoder-normalize-before", "remove --no-decoder-normalize-before"),
])
def test_bad_router_options_are_refused(data_bin, tmp_path, option, value, match):
    result = run("fairseq-train", str(data_bin / "bin"), "--user-dir", "fairseq_base", *TINY_MODEL, "--cpu",
                 "--save-dir", str(tmp_path), option, *value.split(), "--max-update", "1", check=False)
    assert result.returncode != 0
    assert re.search(f"fairseq_base: error: .*{re.escape(match)}", result.stderr), result.stderr[-2000:]


@pytest.mark.slow
def test_a_refused_start_leaves_no_directory_behind(data_bin, tmp_path):
    result = run("fairseq-train", str(data_bin / "bin"), "--user-dir", "fairseq_base", *TINY_MODEL, "--cpu",
                 "--save-dir", str(tmp_path / "new" / "run"), "--base-moe-freq", "-1", "--max-update", "1", check=False)
    assert result.returncode != 0 and "--base-moe-freq must be >= 0" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "new").exists()  # fairseq made it, and it stayed empty


@pytest.mark.parametrize("router", ["lossfree"] + [pytest.param(record.name, marks=pytest.mark.slow)
                                                  for record in ROUTER_RECORDS
                                                  if record.name not in ("lossfree", "balanced")])
def test_router_trains_in_one_process_and_logs_its_statistics(data_bin, router_runs, router):
    save_dir, result = router_runs(router)
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
        # A router of token ids (hash): a token's expert never changes.
        assert churn == 0 if not ROUTER[router].reads_scores else 0 <= churn <= 1
    assert ("balance_loss" in train) == ROUTER[router].balance_loss
    assert re.search(r"moe1_dropped 0 ", valid)  # nothing dropped outside training
    events = b"".join(p.read_bytes() for p in (save_dir / "tb").rglob("events*"))
    assert b"moe1_entropy" in events and b"base1_load_min" in events and b"base1_churn" in events
    run("fairseq-eval-lm", str(data_bin / "bin"), "--user-dir", "fairseq_base", "--path",
        str(save_dir / "checkpoint_last.pt"), "--cpu", "--tokens-per-sample", "64", "--max-valid-steps", "2",
        "--gen-subset", "valid")


# Expert FFNs only (per-rank files that fairseq alone would not write), under both DDP backends.
@pytest.mark.slow
@pytest.mark.parametrize("router,base_layers,backend", [("switch", 0, "legacy_ddp"), ("hash", 0, "c10d")])
def test_router_trains_on_two_gloo_workers(data_bin, tmp_path, router, base_layers, backend):
    flags = ["--base-router", router, *ROUTER_RUN, "--base-layers", str(base_layers), "--ddp-backend", backend,
             "--log-interval", "5"]
    curve = losses(torchrun_train(2, data_bin, tmp_path, *flags, "--max-update", "30"))
    assert curve[30] < curve[5] - 0.3, curve
    # Per-rank checkpoints also without BASE layers (fairseq keys them on --base-layers > 0).
    shards = [torch.load(tmp_path / f"checkpoint_last-rank-{r}.pt", weights_only=False)["model"] for r in (0, 1)]
    ids_keys = [k for k in shards[0] if k.endswith(EXPERT_IDS)]
    assert len(ids_keys) == 1 + base_layers  # the expert FFN of layer 2 (and the BASE layer)
    for key in ids_keys:
        assert shards[0][key].tolist() == [0, 1] and shards[1][key].tolist() == [2, 3]
    shared = [k for k in shards[0] if ".experts." not in k and not k.endswith(EXPERT_IDS)]
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


@pytest.mark.parametrize("router", [record.name for record in ROUTER_RECORDS])
def test_expert_ffn_slots_start_as_fairseqs_ffn_blocks_and_base_layers_as_the_identity(data_bin, router):
    """An expert in a feed-forward slot starts as the block it replaces would (nn.Linear's draws,
    as fairseq's fc1 and fc2, and fairseq's MoE and ParlAI's hash layers); a BASE layer's experts
    start as the identity (the paper: the last projection zero)."""
    model = build(data_bin, "--base-layers", "1", "--base-moe-freq", "2", "--base-router", router,
                  "--base-experts", "4")
    base, slot = model.decoder.layers[1], model.decoder.layers[2].moe
    assert isinstance(base, BaseLayer) and isinstance(slot, BaseLayer)
    assert not base.experts.sublayers[0].ff2_weight.any() and not base.experts.sublayers[0].ff2_bias.any()
    dense_fc2 = build(data_bin).decoder.layers[1].fc2
    expert = slot.experts.sublayers[0]
    for stacked, dense in ((expert.ff2_weight, dense_fc2.weight), (expert.ff2_bias, dense_fc2.bias),
                           (expert.ff1_weight, None)):
        bound = 1 / math.sqrt(stacked.size(1) if stacked.dim() == 3 else 64)  # nn.Linear's: 1 / sqrt(fan_in)
        assert stacked.abs().max() <= bound and stacked.std() > 0.45 * bound  # uniform: std = bound / sqrt(3)
        if dense is not None:
            assert float(stacked.std()) == pytest.approx(float(dense.std()), rel=0.25)
    assert not torch.equal(expert.ff2_weight[0], expert.ff2_weight[1])  # every expert drawn on its own


def padded_batch(data_bin):
    """A training batch of --sample-break-mode eos (one sentence per row, padded to the longest)."""
    from fairseq import checkpoint_utils, tasks
    cfg = checkpoint_utils.convert_namespace_to_omegaconf(parse(data_bin, "--sample-break-mode", "eos"))
    task = tasks.setup_task(cfg.task)
    task.load_dataset("valid")
    batches = task.get_batch_iterator(task.dataset("valid"), max_sentences=6).next_epoch_itr(shuffle=False)
    pad = task.dictionary.pad()
    return next(sample for sample in batches if sample["net_input"]["src_tokens"].eq(pad).any()), pad


@pytest.mark.parametrize("router", [record.name for record in ROUTER_RECORDS])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_padding_takes_no_expert_and_the_real_tokens_route_as_without_it(data_bin, router, training):
    """Every expert layer of a padded batch routes its real tokens as it routes those tokens alone
    (no padding): the same experts and gates, the same capacity and balance loss, and its counts
    (loads, tokens) hold real tokens only; padding positions pass the layer unchanged."""
    sample, pad = padded_batch(data_bin)
    tokens = sample["net_input"]["src_tokens"]
    real = tokens.ne(pad)
    model = build(data_bin, "--base-layers", "1", "--base-moe-freq", "2", "--base-router", router,
                  "--base-experts", "4", "--base-balance-loss", "0").train(training)
    seen = {}

    def reseed(layer, inputs):  # top2's sampled second choice draws the same numbers below
        torch.manual_seed(0)

    def keep(layer, inputs, output):
        x = inputs[0]
        seen[layer.name] = (x.detach().clone(), output[0].detach().clone(), layer.stats.step_counts.clone())

    for layer in model.modules():
        if isinstance(layer, BaseLayer):
            layer.register_forward_hook(keep)
            layer.register_forward_pre_hook(reseed)
    model(**sample["net_input"])
    layers = {m.name: m for m in model.modules() if isinstance(m, BaseLayer)}
    assert set(seen) == {"base1", "moe1"}
    rows = real.t().reshape(-1)  # hidden states are time-major
    for name, (x, out, counts) in seen.items():
        layer = layers[name]
        flat_in, flat_out = x.reshape(-1, x.size(-1)), out.reshape(-1, out.size(-1))
        assert torch.equal(flat_out[~rows], flat_in[~rows])  # padding passes unchanged
        alone_in = flat_in[rows][:, None]  # the real tokens alone: [N, 1, d], no padding
        layer.token_ids = tokens.t().reshape(-1)[rows][None]
        layer.stats.step_counts.zero_()
        torch.manual_seed(0)
        with torch.no_grad():
            alone_out = layer(alone_in)[0]
        assert torch.allclose(alone_out[:, 0], flat_out[rows], atol=1e-5), name
        if training:
            assert torch.equal(layer.stats.step_counts, counts)  # what the step's statistics hold
            assert counts[-1] == real.sum() and counts[:4].sum() == real.sum() * ROUTER[router].choices


@pytest.mark.parametrize("router", ["balanced", "switch", "top2", "hash", "lossfree"])
def test_gate_one_weighs_every_tokens_update_one_and_keeps_the_routers_gradient(router):
    torch.manual_seed(0)
    layer = BaseLayer(8, 16, num_experts=4, router=router, gate="one", vocab_size=30, capacity_factor=0.0).train()
    layer.token_ids = torch.randint(30, (1, 24))
    routing, scores = layer.route(torch.randn(24, 8))
    kept = routing.kept_mask()
    assert torch.allclose(routing.gates.detach().sum(1)[kept.any(1)], torch.ones(int(kept.any(1).sum())))
    if router == "top2":
        assert torch.allclose(routing.gates.detach()[kept.all(1)], torch.full((int(kept.all(1).sum()), 2), 0.5))
    if router != "hash":  # the gradient reaches the centroids as the router's own gate's would
        published = BaseLayer(8, 16, num_experts=4, router=router, vocab_size=30).train()
        published.load_state_dict(layer.state_dict())
        torch.manual_seed(1)
        x = torch.randn(24, 8)
        torch.manual_seed(2)
        ones, _ = layer.route(x)
        torch.manual_seed(2)
        own, _ = published.route(x)
        assert torch.equal(ones.expert_ids, own.expert_ids)
        ones.gates.sum().backward()
        (own.gates * ones.kept_mask() / ones.kept_mask().sum(1, keepdim=True).clamp_min(1)).sum().backward()
        assert torch.allclose(layer.centroids.grad, published.centroids.grad, atol=1e-6)
    with pytest.raises(BaseLayerConfigError, match="--base-gate must be one of router, one; got 'half'"):
        BaseLayer(8, 16, num_experts=4, gate="half")

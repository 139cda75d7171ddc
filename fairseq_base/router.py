"""Routers: pure functions from token-expert scores (or token ids) to a ``Routing``.

A token's output is h + sum_k gate_k * update_k(h), over its chosen experts k that had
room for it; update_k(h) = expert_k(h) - h. Routers differ in how they choose and gate
(docs/routers.md names the reference code each follows):

    balanced  BASE (training): the balanced assignment, gate sigmoid(score)
    sbase     S-BASE (training): Sinkhorn's approximately balanced assignment, gate sigmoid(score)
    greedy    BASE and S-BASE (inference): top-1 score, gate sigmoid(score)
    switch    Switch Transformer: top-1 of softmax, gate = its probability, capacity, balance loss
    top2      GShard / fairseq's MoE top-2: the first expert by softmax, the second sampled in
              training (Gumbel noise on the other logits) or the runner-up; capacity; the two
              gates renormalised over the pairs kept; balance loss
    hash      Hash layers: a fixed expert per token id (random, or balanced by the tokens'
              counts), gate 1, no parameters
    lossfree  DeepSeek-V3's auxiliary-loss-free balancing: top-1 of sigmoid(score) + a
              per-expert bias (used to choose only), gate sigmoid(score); the bias moves toward
              the under-loaded experts once per optimizer step (``update_expert_bias``)

Capacity: expert e takes at most ceil(capacity_factor * T / E) (token, choice) pairs; first
choices come before second choices, then token order. A token over capacity gets no
update from that expert (with no expert left it passes through the residual).
"""

import dataclasses
import heapq
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fairseq_base.assignment import balanced_assignment_and_counts, greedy_assignment, sinkhorn_assignment
from fairseq_base.errors import BaseLayerConfigError

HASH_SEED = 1234  # shared by every worker and every run: the hash is part of the model


@dataclass
class Routing:
    expert_ids: Tensor  # [T, k] chosen experts, best first
    gates: Tensor  # [T, k] weight of each chosen expert's update (differentiable)
    kept: Optional[Tensor] = None  # [T, k] bool: the expert had room for the pair; None: all had
    balance_loss: Optional[Tensor] = None  # unweighted auxiliary loss (1.0 when perfectly balanced)
    # Tokens per expert as host ints, where the router knows them without reading the device
    # (BASE's assignment is solved on a host copy); None: the dispatcher counts them.
    expert_counts: Optional[List[int]] = None

    def kept_mask(self) -> Tensor:
        return torch.ones_like(self.expert_ids, dtype=torch.bool) if self.kept is None else self.kept


def count_per_expert(expert_ids: Tensor, num_experts: int, dtype=torch.long) -> Tensor:
    """[E]: how often each expert appears in ``expert_ids``, on their device without reading it
    (``torch.bincount`` reads the largest id to size its output: a host synchronisation)."""
    counts = torch.zeros(num_experts, dtype=dtype, device=expert_ids.device)
    return counts.index_add_(0, expert_ids.reshape(-1), torch.ones(expert_ids.numel(), dtype=dtype,
                                                                   device=expert_ids.device))


def sigmoid_gated(scores: Tensor, expert_ids: Tensor, expert_counts: Optional[List[int]] = None) -> Routing:
    """BASE's routing: token t to expert ``expert_ids[t]``, gated by sigmoid(scores[t, expert_ids[t]])."""
    ids = expert_ids[:, None]
    return Routing(ids, torch.sigmoid(scores.gather(1, ids)), expert_counts=expert_counts)


def balanced_routing(scores: Tensor) -> Routing:
    return sigmoid_gated(scores, *balanced_assignment_and_counts(scores.detach()))


def sbase_routing(scores: Tensor) -> Routing:
    return sigmoid_gated(scores, sinkhorn_assignment(scores.detach()))


def greedy_routing(scores: Tensor) -> Routing:
    return sigmoid_gated(scores, greedy_assignment(scores.detach()))


def lossfree_routing(scores: Tensor, bias: Tensor, bias_on_affinity: bool = True) -> Routing:
    """Top-1 of ``sigmoid(scores) + bias`` (``bias`` [E]), gated by the unbiased sigmoid(score):
    the bias steers the choice and nothing else (Wang et al., 2024; DeepSeek-V3's
    ``inference/model.py`` adds it to the sigmoid affinity, in (0, 1), where a step of the bias
    is commensurate with the gaps it must close). The same in training and inference; nothing
    is dropped. ``bias_on_affinity`` False: the bias on the raw score, as this plugin did before
    (kept for the checkpoints trained that way)."""
    choice = torch.sigmoid(scores.detach()) if bias_on_affinity else scores.detach()
    return sigmoid_gated(scores, greedy_assignment(choice + bias))


def update_expert_bias(bias: Tensor, load: Tensor, rate: float) -> None:
    """bias_e += rate * sign(mean load - load_e), in place: the under-loaded experts become more
    attractive, the over-loaded less. ``load`` [E]: tokens routed to each expert since the last
    update, by every worker."""
    bias.add_(torch.sign(load.mean() - load), alpha=rate)


def capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """How many (token, choice) pairs an expert takes from ``num_tokens`` tokens."""
    return math.ceil(capacity_factor * num_tokens / num_experts)


def within_capacity(expert_ids: Tensor, num_experts: int, limit: int) -> Tensor:
    """[T, k] bool: pair (t, c) is among the first ``limit`` of its expert, in (choice, token) order."""
    flat = expert_ids.t().reshape(-1)  # all first choices, then all second choices
    order = torch.argsort(flat, stable=True)
    counts = count_per_expert(flat, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(flat)
    position[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return (position < limit).view(expert_ids.t().shape).t()


def switch_balance_loss(probs: Tensor, top1: Tensor) -> Tensor:
    """E * sum_i f_i * P_i (Switch Transformer eq. 4): f_i the share of tokens whose top-1 is
    expert i, P_i the mean router probability of expert i. 1.0 under uniform routing."""
    num_experts = probs.size(1)
    if probs.size(0) == 0:
        return probs.new_zeros(())
    fraction = count_per_expert(top1, num_experts, probs.dtype) / probs.size(0)
    return num_experts * torch.dot(fraction, probs.mean(0))


def switch_routing(scores: Tensor, capacity_factor: Optional[float] = 1.0) -> Routing:
    """Top-1 (Fedus et al., 2021); ``capacity_factor`` None keeps every token."""
    probs = F.softmax(scores.float(), dim=1)
    gates, ids = probs.max(dim=1, keepdim=True)
    kept = None
    if capacity_factor is not None:
        kept = within_capacity(ids, scores.size(1), capacity(scores.size(0), scores.size(1), capacity_factor))
    return Routing(ids, gates, kept, switch_balance_loss(probs, ids[:, 0]))


def top2_routing(scores: Tensor, capacity_factor: Optional[float] = 2.0, sample_second: bool = False) -> Routing:
    """Top-2 as fairseq's MoE branch gates it (``top2gate.py``, after GShard, Lepikhin et al.,
    2021): the first expert is the most probable; the second is sampled (``sample_second``: the
    Gumbel-max trick on the other experts' logits, fairseq's default policy in training) or the
    runner-up. Both gates are the softmax probabilities of the chosen experts, renormalised over
    the pairs that found room (a token whose second pair was dropped gets gate 1 on its first).
    ``capacity_factor`` None keeps every pair."""
    logits = scores.float()
    probs = F.softmax(logits, dim=1)
    first = probs.argmax(dim=1, keepdim=True)
    if sample_second:
        gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-20, 1 - 1e-7)))
        others = logits.detach() + gumbel
    else:
        others = logits.detach()
    second = others.scatter(1, first, float("-inf")).argmax(dim=1, keepdim=True)
    ids = torch.cat([first, second], dim=1)
    num_experts = scores.size(1)
    kept = None
    gates = probs.gather(1, ids)
    if capacity_factor is not None:
        kept = within_capacity(ids, num_experts, capacity(scores.size(0), num_experts, capacity_factor))
        gates = gates * kept
    gates = gates / gates.sum(1, keepdim=True).clamp_min(torch.finfo(gates.dtype).eps)
    return Routing(ids, gates, kept, switch_balance_loss(probs, first[:, 0]))


def gate_one(routing: Routing) -> Routing:
    """``--base-gate one``, an ablation (no paper's method): every token's update at weight 1 in
    all, its kept choices sharing it equally (top-2: 1/2 each), each gate keeping the gradient of
    the router's own gate g (1 + g - g.detach(): value 1, gradient that of g, straight through).
    The routers then differ in their choices of expert alone. Hash, whose gate is 1 with no
    gradient, is unchanged."""
    kept = routing.kept_mask().to(routing.gates.dtype)
    share = kept / kept.sum(1, keepdim=True).clamp_min(1)
    return dataclasses.replace(routing, gates=(1 + routing.gates - routing.gates.detach()) * share)


GATES = ("router", "one")  # --base-gate: the router's own, or gate_one


def random_hash(vocab_size: int, num_experts: int, seed: int = HASH_SEED) -> Tensor:
    """[V]: a fixed random expert for every token id (Roller et al., 2021)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(num_experts, (vocab_size,), generator=generator)


def balanced_hash(token_counts: Sequence[int], num_experts: int) -> Tensor:
    """[V]: every token id to an expert so that each expert's total count is about the same
    (Roller et al., 2021, "balanced assignment": the most frequent tokens first, each to the
    expert with the smallest total so far; ties to the lower token id and expert)."""
    totals = [(0, expert) for expert in range(num_experts)]
    table = torch.empty(len(token_counts), dtype=torch.long)
    for token in sorted(range(len(token_counts)), key=lambda t: (-token_counts[t], t)):
        total, expert = heapq.heappop(totals)
        table[token] = expert
        heapq.heappush(totals, (total + token_counts[token], expert))
    return table


HASHES = ("random", "balanced")


def hash_table(kind: str, num_experts: int, vocab_size: int, token_counts: Optional[Sequence[int]]) -> Tensor:
    """[V] the expert of each token id: ``kind`` random or balanced (by ``token_counts``)."""
    if kind not in HASHES:
        raise BaseLayerConfigError(f"--base-hash must be one of {', '.join(HASHES)}; got {kind!r}")
    if kind == "balanced" and token_counts is None:
        raise BaseLayerConfigError("--base-hash balanced needs the dictionary's token counts")
    return balanced_hash(token_counts, num_experts) if kind == "balanced" else random_hash(vocab_size, num_experts)


def hash_routing(token_ids: Tensor, table: Tensor) -> Routing:
    """Token t (``token_ids`` [T], any shape of T ids) to expert ``table[token_ids[t]]``, gate 1."""
    ids = table[token_ids.reshape(-1)][:, None]
    return Routing(ids, torch.ones(ids.shape, device=ids.device))


@dataclass
class RouteContext:
    """What a router may need beyond the scores, from its layer (``BaseLayer.route_context``)."""

    training: bool
    capacity_factor: Optional[float] = None  # the layer's; applied in training only
    bias: Optional[Tensor] = None  # lossfree's choice bias [E]
    bias_on_affinity: bool = True  # lossfree: the bias on sigmoid(score) (False: on the score, as before)
    sample_second: bool = False  # top2: the second expert sampled in training
    token_ids: Optional[Tensor] = None  # hash: [T]
    hash_table: Optional[Tensor] = None  # hash: [V]

    @property
    def capacity(self) -> Optional[float]:
        """The capacity factor to apply: none outside training, so that no output depends on its batch."""
        return self.capacity_factor if self.training else None


@dataclass(frozen=True)
class RouterRecord:
    """One router: everything the model, its options, ``BaseLayer`` and the tests know of it."""

    name: str
    route: Callable[[Optional[Tensor], RouteContext], Routing]  # (scores [T, E] or None, context)
    reads_scores: bool  # False: routes by token id (no centroids)
    has_bias: bool  # a per-expert choice bias, moved once per optimizer step
    drops_tokens: bool  # capacity in training
    default_capacity: Optional[float]  # the paper's capacity factor, for routers that drop tokens
    balance_loss: bool  # a Switch-style auxiliary loss (needs --criterion base_cross_entropy)
    balanced_in_training: bool  # BASE's family: --base-eval-routing outside training; shuffled on several workers
    choices: int  # experts per token
    summary: str  # for --base-router's help
    reference: str  # the code it follows (docs/routers.md's table says more)


ROUTER_RECORDS = (
    RouterRecord("balanced", lambda scores, ctx: balanced_routing(scores), reads_scores=True, has_bias=False,
                 drops_tokens=False, default_capacity=None, balance_loss=False, balanced_in_training=True, choices=1,
                 summary="BASE", reference="facebookresearch/fairseq, fairseq/modules/base_layer.py"),
    RouterRecord("sbase", lambda scores, ctx: sbase_routing(scores), reads_scores=True, has_bias=False,
                 drops_tokens=False, default_capacity=None, balance_loss=False, balanced_in_training=True, choices=1,
                 summary="BASE with Sinkhorn's approximate balance (Clark et al.)",
                 reference="Clark et al. 2022 (described there; no code released)"),
    RouterRecord("switch", lambda scores, ctx: switch_routing(scores, ctx.capacity), reads_scores=True,
                 has_bias=False, drops_tokens=True, default_capacity=1.0, balance_loss=True,
                 balanced_in_training=False, choices=1, summary="top-1 softmax (Fedus et al.)",
                 reference="facebookresearch/fairseq, branch nllb, fairseq/modules/moe/top1gate.py"),
    RouterRecord("top2", lambda scores, ctx: top2_routing(scores, ctx.capacity, ctx.training and ctx.sample_second),
                 reads_scores=True, has_bias=False, drops_tokens=True, default_capacity=2.0, balance_loss=True,
                 balanced_in_training=False, choices=2,
                 summary="GShard top-2, the second expert sampled in training (see --base-top2-second)",
                 reference="facebookresearch/fairseq, branch nllb, fairseq/modules/moe/top2gate.py"),
    RouterRecord("hash", lambda scores, ctx: hash_routing(ctx.token_ids, ctx.hash_table), reads_scores=False,
                 has_bias=False, drops_tokens=False, default_capacity=None, balance_loss=False,
                 balanced_in_training=False, choices=1,
                 summary="a fixed expert per token id (Roller et al.; see --base-hash)",
                 reference="facebookresearch/ParlAI, projects/params_vs_compute/hash_ladder/hash_ladder.py"),
    RouterRecord("lossfree", lambda scores, ctx: lossfree_routing(scores, ctx.bias, ctx.bias_on_affinity),
                 reads_scores=True, has_bias=True, drops_tokens=False, default_capacity=None, balance_loss=False,
                 balanced_in_training=False, choices=1,
                 summary="top-1 of sigmoid(score) + a per-expert bias nudged toward the under-loaded experts "
                         "(DeepSeek-V3)",
                 reference="deepseek-ai/DeepSeek-V3, inference/model.py"),
)
ROUTER = {record.name: record for record in ROUTER_RECORDS}
# The routing of BASE's family outside training (--base-eval-routing).
EVAL_ROUTING = {"greedy": greedy_routing, "balanced": balanced_routing}


# What ``routing_counts`` counts after the E loads.
COUNTED = ("top1", "kept", "entropy", "tokens")


def routing_counts(routing: Routing, scores: Optional[Tensor], num_experts: int) -> Tensor:
    """[E + 4] float32 sums over this worker's tokens, which add up across workers: the (token,
    choice) pairs routed to each expert before capacity (E numbers), then the tokens whose kept
    first choice is their top-1 expert, the kept pairs, the sum of the tokens' routing entropies
    (nats) and the tokens."""
    ids = routing.expert_ids
    load = count_per_expert(ids, num_experts, torch.float32)
    kept = routing.kept_mask()
    first_kept = kept[:, 0]
    if scores is None:  # hash: a token's only expert is its top-1
        top1, entropy = first_kept.sum(), load.new_zeros(())
    else:
        top1 = (first_kept & (ids[:, 0] == greedy_assignment(scores))).sum()
        log_probs = F.log_softmax(scores.float(), dim=1)
        entropy = -(log_probs.exp() * log_probs).sum()
    tokens = load.new_full((), float(ids.size(0)))  # a fill, not a copy from the host
    return torch.cat([load, torch.stack([top1.float(), kept.sum().float(), entropy, tokens])])


def stats_from_counts(counts: Tensor, num_experts: int) -> Dict[str, Tensor]:
    """What the logs show for every router, from ``routing_counts`` (of one worker, or summed over
    all workers for the batch's):

    top1      share of tokens whose update comes from their top-1 expert
    load_max  (token, choice) pairs routed to the busiest expert over the mean, before capacity
    load_min  the same for the idlest expert
    dropped   share of (token, choice) pairs over capacity
    entropy   mean entropy (nats) of a token's routing distribution: softmax(scores); 0 for hash

    All 0 for no tokens.
    """
    load, (top1, kept, entropy, tokens) = counts[:num_experts], counts[num_experts:]
    pairs, mean_load = load.sum(), load.mean().clamp_min(1e-12)
    return {
        "top1": top1 / tokens.clamp_min(1),
        "load_max": load.max() / mean_load,
        "load_min": load.min() / mean_load,
        "dropped": (pairs - kept) / pairs.clamp_min(1),
        "entropy": entropy / tokens.clamp_min(1),
    }


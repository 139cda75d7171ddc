"""Token-to-expert assignment: the balanced solver used in training, greedy top-1, and
Sinkhorn's approximate balance (S-BASE).

``balanced_assignment`` solves

    maximise   sum_t scores[t, a(t)]
    subject to every expert receiving floor(T/E) or ceil(T/E) tokens

with a forward auction (Bertsekas 1992) and epsilon scaling. The auction is run
on "slots": each expert has floor(T/E) main slots and, when E does not divide T,
one extra slot. E - (T mod E) phantom tokens that may only take extra slots (and
gain nothing there) fill the extra slots that no real token should get, so that
every slot is taken and the problem is a square transportation problem for which
the auction's epsilon-complementary-slackness bound holds:

    objective >= optimum - (number of slot holders) * epsilon.

On CPU the auction runs in a small C++ kernel (``csrc/auction.cpp``, compiled on first
use, one bid at a time); elsewhere, or if the kernel cannot be built, in PyTorch, where all
unassigned tokens bid at once (Jacobi auction) and each slot column keeps its highest
bidders, so that there is no Python loop over tokens.
"""

import hashlib
import logging
import math
import os
import platform

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Epsilon-scaling schedule: start at INITIAL_EPS * span (most tokens keep their top-1
# expert, so a fine start wastes little), divide by EPS_FACTOR per phase, and stop at a
# final epsilon small enough that the bound above is a negligible share of the score
# span (FINAL_GAP * span in total over all tokens). Tuned with scripts/bench_assignment.py.
INITIAL_EPS = 1e-3
EPS_FACTOR = 16.0
FINAL_GAP = 1e-6
# Sinkhorn (S-BASE): stop when every expert's share of the plan is within 1% of T/E.
SINKHORN_TOLERANCE = 0.01
SINKHORN_MAX_ITERATIONS = 100


def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be a [tokens, experts] matrix, got shape {tuple(scores.shape)}")
    if scores.size(1) < 1:
        raise ValueError("scores must have at least one expert column")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")


def sanitize_scores(scores: Tensor, dtype=torch.float64):
    """(copy in ``dtype`` in which NaN and -inf rank below every finite score and +inf above, its span)."""
    s = scores.detach().to(dtype)
    lo, hi = torch.aminmax(s)
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):  # aminmax propagates NaN: all finite
        return s, float(hi - lo)
    finite = torch.isfinite(s)
    if not bool(finite.any()):
        return torch.zeros_like(s), 0.0
    lo, hi = s[finite].min(), s[finite].max()
    span = torch.clamp(hi - lo, min=1.0)
    s = torch.where(torch.isnan(s), lo - span, s)
    return torch.minimum(torch.maximum(s, lo - span), hi + span), float(3 * span)


def greedy_assignment(scores: Tensor) -> Tensor:
    """Each token to its highest-scoring expert (NaN counts as lowest). Returns LongTensor [T]."""
    _check_scores(scores)
    return scores.detach().masked_fill(torch.isnan(scores), float("-inf")).argmax(dim=1)


def balanced_assignment(scores: Tensor) -> Tensor:
    """Balanced token-to-expert assignment maximising total affinity.

    Args:
        scores: float tensor [T, E] (any float dtype, any device) of token-expert affinities.

    Returns:
        LongTensor [T] of expert ids in which every expert appears floor(T/E) or ceil(T/E) times.
    """
    _check_scores(scores)
    num_tokens, num_experts = scores.shape
    if num_tokens == 0 or num_experts == 1:
        return torch.zeros(num_tokens, dtype=torch.long, device=scores.device)

    kernel = _cpu_kernel() if scores.device.type == "cpu" else None
    # The kernel reads float32 or float64 scores; both auctions keep their prices in float64.
    dtype = torch.float32 if kernel is not None and scores.dtype != torch.float64 else torch.float64
    scores, span = sanitize_scores(scores, dtype)
    rows = num_tokens + (num_experts - num_tokens % num_experts) % num_experts  # tokens + phantoms
    initial_eps, final_eps = _eps_range(span, rows)
    if kernel is not None:
        return kernel.auction_assignment(scores, initial_eps, final_eps, EPS_FACTOR)
    benefit, capacity = _slot_problem(scores)
    slot = _auction(benefit, capacity, initial_eps, final_eps)
    return slot[:num_tokens] % num_experts


def sinkhorn_assignment(scores: Tensor, tolerance: float = SINKHORN_TOLERANCE,
                        max_iterations: int = SINKHORN_MAX_ITERATIONS) -> Tensor:
    """Approximately balanced assignment (S-BASE, Clark et al. 2022): scale exp(scores) by
    row and column factors until every token's row sums to 1 and every expert's column to
    T/E (Sinkhorn-Knopp, in log space), then take each token's top expert of the scaled plan.

    Loads are balanced only as far as the plan's argmax follows its marginals: close for
    soft scores, further off for sharp ones. Stops when every column is within
    ``tolerance`` of T/E (relative) or after ``max_iterations``. Returns LongTensor [T].
    """
    _check_scores(scores)
    num_tokens, num_experts = scores.shape
    if num_tokens == 0 or num_experts == 1:
        return torch.zeros(num_tokens, dtype=torch.long, device=scores.device)
    log_plan, _ = sanitize_scores(scores, torch.float32)
    log_column_target = math.log(num_tokens / num_experts)
    column_scale = log_plan.new_zeros(num_experts)
    for _ in range(max_iterations):
        row_scale = -torch.logsumexp(log_plan + column_scale, dim=1, keepdim=True)
        log_columns = torch.logsumexp(log_plan + row_scale, dim=0) + column_scale
        if float((log_columns - log_column_target).abs().max()) < tolerance:
            break
        column_scale = column_scale + log_column_target - log_columns
    # The row factor does not change a token's argmax.
    return (log_plan + column_scale).argmax(dim=1)


def _eps_range(span: float, rows: int):
    """First and last epsilon of the scaling schedule for scores spanning ``span``."""
    span = span or 1.0
    return INITIAL_EPS * span, FINAL_GAP * span / rows


_KERNEL = {}


def _cpu_kernel():
    """The compiled CPU auction, or None (with one warning) if it cannot be built here."""
    if "auction" not in _KERNEL:
        try:
            from torch.utils.cpp_extension import load
            source = os.path.join(os.path.dirname(__file__), "csrc", "auction.cpp")
            # Built with -march=native: name the build after the CPU so that a shared cache
            # never hands one machine's binary to another kind of CPU.
            cpu = hashlib.md5(_cpu_model().encode()).hexdigest()[:8]
            _KERNEL["auction"] = load(name=f"fairseq_base_auction_{cpu}", sources=[source],
                                      extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                      extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as err:  # no compiler or no ninja: the PyTorch auction still works
            logger.warning(f"fairseq_base: CPU auction kernel unavailable ({err}); using the PyTorch auction")
            _KERNEL["auction"] = None
    return _KERNEL["auction"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.machine() + platform.processor()


def _slot_problem(scores: Tensor):
    """The square slot problem: benefit [T + phantoms, slots] and capacity [slots]."""
    num_tokens, num_experts = scores.shape
    per_expert, remainder = divmod(num_tokens, num_experts)
    blocks, capacity = [], []
    if per_expert > 0:  # main slots: column e holds per_expert tokens of expert e
        blocks.append(scores)
        capacity.append(torch.full((num_experts,), per_expert))
    if remainder > 0:  # extra slots: column E + e holds one more token of expert e
        blocks.append(scores)
        capacity.append(torch.ones(num_experts, dtype=torch.long))
    benefit = torch.cat(blocks, dim=1)
    capacity = torch.cat(capacity).to(scores.device)
    if remainder > 0:
        phantoms = torch.full((num_experts - remainder, benefit.size(1)), float("-inf"),
                              dtype=benefit.dtype, device=benefit.device)
        phantoms[:, -num_experts:] = 0.0
        benefit = torch.cat([benefit, phantoms], dim=0)
    return benefit, capacity


def _auction(benefit: Tensor, capacity: Tensor, eps: float, final_eps: float) -> Tensor:
    """Forward Jacobi auction with epsilon scaling; returns the slot column of every row.

    ``benefit`` is [N, C] float64 with -inf for forbidden (row, column) pairs, every row has
    at least two allowed columns, and ``capacity.sum() == N``.
    """
    num_rows, num_cols = benefit.shape
    device = benefit.device

    price = torch.zeros(num_cols, dtype=benefit.dtype, device=device)
    column = torch.full((num_rows,), -1, dtype=torch.long, device=device)
    held_bid = torch.zeros(num_rows, dtype=benefit.dtype, device=device)
    rows = torch.arange(num_rows, device=device)

    while True:
        assigned = column >= 0
        if bool(assigned.any()):
            # Keep the holders that still satisfy eps-complementary slackness, each at the
            # bid it would make now (distinct bids keep the price war short).
            value = benefit - price
            own_col = column.clamp(min=0)
            own = value[rows, own_col]
            other = value.scatter(1, own_col[:, None], float("-inf")).max(dim=1).values
            keep = assigned & (own >= torch.maximum(own, other) - eps)
            column = torch.where(keep, column, torch.full_like(column, -1))
            held_bid = torch.where(keep, benefit[rows, own_col] - other + eps, held_bid)
        _auction_phase(benefit, capacity, price, column, held_bid, eps)
        if eps <= final_eps:
            return column
        eps = max(eps / EPS_FACTOR, final_eps)


def _auction_phase(benefit, capacity, price, column, held_bid, eps) -> None:
    """Bid until every row holds a slot; updates price, column and held_bid in place."""
    num_cols = benefit.size(1)
    while True:
        bidders = torch.nonzero(column < 0).squeeze(1)
        if bidders.numel() == 0:
            return
        value = benefit[bidders] - price
        top2 = value.topk(2, dim=1)
        target = top2.indices[:, 0]
        # Bid up to the price at which the second-best column would be as good.
        bid = benefit[bidders, target] - top2.values[:, 1] + eps

        holders = torch.nonzero(column >= 0).squeeze(1)
        cand_row = torch.cat([holders, bidders])
        cand_col = torch.cat([column[holders], target])
        cand_bid = torch.cat([held_bid[holders], bid])
        # Group candidates by column, highest bid first; on equal bids the holder stays.
        order = torch.argsort(cand_bid, descending=True, stable=True)
        order = order[torch.argsort(cand_col[order], stable=True)]
        cand_row, cand_col, cand_bid = cand_row[order], cand_col[order], cand_bid[order]
        per_col = torch.bincount(cand_col, minlength=num_cols)
        first = torch.cumsum(per_col, 0) - per_col
        rank = torch.arange(cand_col.numel(), device=benefit.device) - first[cand_col]
        won = rank < capacity[cand_col]

        column[cand_row] = torch.where(won, cand_col, torch.full_like(cand_col, -1))
        held_bid[cand_row[won]] = cand_bid[won]
        # A full column's price is its lowest winning bid; a column with free slots keeps its price.
        full = torch.minimum(per_col, capacity) == capacity
        lowest = torch.full_like(price, float("inf")).scatter_reduce(
            0, cand_col[won], cand_bid[won], reduce="amin")
        price.copy_(torch.where(full, lowest, price))

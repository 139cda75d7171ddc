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

The auction runs in a small C++ kernel (``csrc/auction.cpp``, built at install for each
x86-64 vector width and loaded for the CPU's, or compiled on first use; one bid at a time),
on a host copy of the scores when they are on a GPU. Where the kernel cannot be built it
runs in PyTorch, where all unassigned tokens bid at once (Jacobi
auction) and each slot column keeps its highest bidders, with no Python loop over tokens.

Both auctions always end: scores are shifted first (``_shifted``), so that no price
step is lost to rounding, and the bids (kernel) or bidding rounds (PyTorch) are capped;
a capped auction is finished by ``_complete_assignment``, which keeps the exact balance.
"""

import hashlib
import importlib
import logging
import math
import os
import platform
from typing import List, Optional, Tuple

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Epsilon-scaling schedule, in units of the largest row spread (see ``_shifted``): start at
# INITIAL_EPS (most tokens keep their top-1 expert, so a fine start wastes little), divide
# by EPS_FACTOR per phase, and stop at a final epsilon small enough that the bound above is
# a negligible share of the spread (FINAL_GAP in total over all tokens). Tuned with
# scripts/bench_assignment.py.
INITIAL_EPS = 1e-3
EPS_FACTOR = 16.0
FINAL_GAP = 1e-6
# Caps that make every auction end (then ``_complete_assignment`` finishes it): bids per
# slot row for the compiled kernel, bidding rounds for the PyTorch auction. The problems of
# scripts/bench_assignment.py, heavy ties and one popular expert, up to 16384 x 128, need
# under 100 bids per row; the PyTorch auction needs 1,426 rounds at 2048 x 128.
MAX_BIDS_PER_ROW = 1000
MAX_ROUNDS = 20000
SMALLEST_UNIT = 1e-280  # a smaller row spread would make the final epsilon underflow
# Sinkhorn (S-BASE): stop when every expert's share of the plan is within 1% of T/E.
SINKHORN_TOLERANCE = 0.01
SINKHORN_MAX_ITERATIONS = 100
SINKHORN_CHECK_EVERY = 10


def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be a [tokens, experts] matrix, got shape {tuple(scores.shape)}")
    if scores.size(1) < 1:
        raise ValueError("scores must have at least one expert column")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")


def sanitize_scores(scores: Tensor, dtype=torch.float64) -> Tensor:
    """A copy in ``dtype`` in which NaN and -inf rank below every finite score and +inf above.
    Without reading the scores on the host (no synchronisation on a GPU): the stand-ins are
    computed in float64, where they stay finite, and clamped to ``dtype``'s range."""
    s = scores.detach().double()
    finite = torch.isfinite(s)
    any_finite = finite.any()
    lo = torch.where(any_finite, torch.where(finite, s, math.inf).amin(), 0.0)
    hi = torch.where(any_finite, torch.where(finite, s, -math.inf).amax(), 0.0)
    span = torch.clamp(hi - lo, min=1.0)
    s = torch.where(torch.isnan(s), lo - span, s)
    s = torch.minimum(torch.maximum(s, lo - span), hi + span)
    if dtype == torch.float64:
        return s
    info = torch.finfo(dtype)
    return s.clamp(info.min, info.max).to(dtype)


def greedy_assignment(scores: Tensor) -> Tensor:
    """Each token to its highest-scoring expert (NaN counts as lowest). Returns LongTensor [T]."""
    _check_scores(scores)
    return scores.detach().masked_fill(torch.isnan(scores), float("-inf")).argmax(dim=1)


def balanced_assignment(scores: Tensor) -> Tensor:
    """Balanced token-to-expert assignment maximising total affinity.

    Args:
        scores: float tensor [T, E] (any float dtype, any device) of token-expert affinities.

    Returns:
        LongTensor [T] (on the scores' device) of expert ids in which every expert appears
        floor(T/E) or ceil(T/E) times.

    Scores on a GPU are solved by the compiled kernel on a host copy: one device-to-host copy
    instead of a host synchronisation in every bidding round of the PyTorch auction
    (``scripts/bench_assignment.py`` compares the two on CUDA).
    """
    return balanced_assignment_and_counts(scores)[0]


def balanced_assignment_and_counts(scores: Tensor) -> Tuple[Tensor, Optional[List[int]]]:
    """``balanced_assignment`` and how many tokens each expert got, as host ints where they come
    free (the kernel solves on the host), else None."""
    _check_scores(scores)
    num_tokens, num_experts = scores.shape
    if num_tokens == 0 or num_experts == 1:
        counts = [num_tokens] if num_experts == 1 else [0] * num_experts
        return torch.zeros(num_tokens, dtype=torch.long, device=scores.device), counts
    kernel = _cpu_kernel()
    if kernel is None:
        return _torch_auction_assignment(scores), None
    # The one host synchronisation. The kernel reads float32 or float64 scores (its prices are float64).
    host = scores.detach().to("cpu", torch.float64 if scores.dtype == torch.float64 else torch.float32)
    rows = _slot_rows(num_tokens, num_experts)
    initial_eps, final_eps = _eps_range(rows)
    slot = kernel.auction_assignment(host, initial_eps, final_eps, EPS_FACTOR, MAX_BIDS_PER_ROW * rows)
    if slot.numel() == 0:  # the kernel met a NaN or infinite score: stand-ins, then solve
        host = sanitize_scores(host, host.dtype)
        slot = kernel.auction_assignment(host, initial_eps, final_eps, EPS_FACTOR, MAX_BIDS_PER_ROW * rows)
    if bool((slot < 0).any()):
        slot = _complete_assignment(slot, host)
    ids = slot[:num_tokens] % num_experts
    counts = torch.bincount(ids, minlength=num_experts).tolist()  # on the host: free
    if scores.device.type == "cuda":  # pinned, so that the copy back does not wait for the device
        return ids.pin_memory().to(scores.device, non_blocking=True), counts
    return ids.to(scores.device), counts


def _torch_auction_assignment(scores: Tensor) -> Tensor:
    """``balanced_assignment`` by the PyTorch auction, on the scores' device."""
    num_tokens, num_experts = scores.shape
    shifted, unit = _shifted(sanitize_scores(scores, torch.float64))
    benefit, capacity = _slot_problem(shifted)
    initial_eps, final_eps = _eps_range(benefit.size(0), unit)
    slot = _auction(benefit, capacity, initial_eps, final_eps, MAX_ROUNDS)
    if bool((slot < 0).any()):
        slot = _complete_assignment(slot, shifted)
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
    log_plan = sanitize_scores(scores, torch.float32).float()
    log_column_target = math.log(num_tokens / num_experts)
    column_scale = log_plan.new_zeros(num_experts)
    for iteration in range(1, max_iterations + 1):
        row_scale = -torch.logsumexp(log_plan + column_scale, dim=1, keepdim=True)
        log_columns = torch.logsumexp(log_plan + row_scale, dim=0) + column_scale
        # Reading the error waits for the device: look every SINKHORN_CHECK_EVERY iterations only.
        if iteration % SINKHORN_CHECK_EVERY == 0 and float((log_columns - log_column_target).abs().max()) < tolerance:
            break
        column_scale = column_scale + log_column_target - log_columns
    # The row factor does not change a token's argmax.
    return (log_plan + column_scale).argmax(dim=1)


def _eps_range(rows: int, unit: float = 1.0):
    """First and last epsilon of the scaling schedule, in units of the largest row spread."""
    return INITIAL_EPS * unit, FINAL_GAP * unit / rows


def _slot_rows(num_tokens: int, num_experts: int) -> int:
    """Rows of the slot problem: tokens and phantoms."""
    return num_tokens + (num_experts - num_tokens % num_experts) % num_experts


def _shifted(scores: Tensor):
    """(finite float64 scores with each row shifted to a maximum of 0, the largest row spread).

    The shift does not change the balanced optimum; it keeps every value in [-spread, 0]
    whatever the scores' magnitude, so that epsilons in units of the spread are never lost
    to rounding. A spread below SMALLEST_UNIT counts as 1 (such rows are ties at any epsilon).
    The compiled kernel shifts the same way where the scores' magnitude calls for it."""
    shifted = scores - scores.amax(dim=1, keepdim=True)
    spread = float(-shifted.amin()) if shifted.numel() else 0.0
    return shifted, spread if spread >= SMALLEST_UNIT else 1.0


def _complete_assignment(slot: Tensor, scores: Tensor) -> Tensor:
    """The fallback after the bid or round cap: give every row without a slot a free one.

    Phantom rows (which may only take extra slots) go first, each to a free extra slot or,
    if none is left, to one held by a token, which then joins the rows without a slot. Each
    remaining token takes the free slot of its best expert. Every slot ends up taken, so
    loads keep the exact floor/ceil balance; only the objective may fall short.
    """
    logger.warning("fairseq_base: the balanced assignment's auction reached its cap on %d tokens x %d experts; "
                   "finishing greedily (exact balance, objective possibly below the optimum)", *scores.shape)
    num_tokens, num_experts = scores.shape
    benefit, capacity = _slot_problem(_shifted(scores.detach().cpu().double())[0])
    slot = slot.cpu().clone()
    free = capacity.cpu() - torch.bincount(slot[slot >= 0], minlength=capacity.numel())
    extra = torch.arange(capacity.numel() - num_experts if num_tokens % num_experts else capacity.numel(),
                         capacity.numel())
    waiting = [int(row) for row in torch.nonzero(slot < 0).squeeze(1)]
    for row in [r for r in waiting if r >= num_tokens]:  # phantoms
        open_extra = extra[free[extra] > 0]
        if open_extra.numel() > 0:
            column = int(open_extra[0])
        else:
            holder = int(torch.nonzero((slot[:num_tokens, None] == extra).any(1))[0])
            column = int(slot[holder])
            slot[holder], free[column] = -1, free[column] + 1
            waiting.append(holder)
        slot[row], free[column] = column, free[column] - 1
    for row in [r for r in waiting if r < num_tokens and slot[r] < 0]:
        column = int(benefit[row].masked_fill(free <= 0, float("-inf")).argmax())
        slot[row], free[column] = column, free[column] - 1
    return slot.to(scores.device)


_KERNEL = {}
# The kernel's builds (setup.py), widest first, by the vector instructions torch finds on this CPU.
KERNEL_VARIANTS = {"AVX512": ("_auction_avx512", "_auction_avx2", "_auction"), "AVX2": ("_auction_avx2", "_auction")}


def _cpu_kernel():
    """The compiled CPU auction: the widest build installed (setup.py) that this CPU runs, else
    one built here at first use, else None (with one warning)."""
    if "auction" not in _KERNEL:
        capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "DEFAULT"
        for variant in KERNEL_VARIANTS.get(capability, ("_auction",)):
            try:  # importing a build for wider vectors than the CPU has could stop the process: never tried
                _KERNEL["auction"] = importlib.import_module(f"fairseq_base.{variant}")
                return _KERNEL["auction"]
            except ImportError:  # a checkout used without installing it
                pass
        try:
            from torch.utils.cpp_extension import load
            source = os.path.join(os.path.dirname(__file__), "csrc", "auction.cpp")
            # Built with -march=native: name the build after the CPU so that a shared cache
            # never hands one machine's binary to another kind of CPU.
            cpu = hashlib.md5(_cpu_model().encode()).hexdigest()[:8]
            logger.info("fairseq_base: loading the balanced-assignment kernel (the first time on a machine "
                        "it is compiled, which takes about 30 s)")
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


def _auction(benefit: Tensor, capacity: Tensor, eps: float, final_eps: float, max_rounds: int) -> Tensor:
    """Forward Jacobi auction with epsilon scaling; returns the slot column of every row, -1
    for rows left without one when ``max_rounds`` bidding rounds have run.

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
        max_rounds -= _auction_phase(benefit, capacity, price, column, held_bid, eps, max_rounds)
        if eps <= final_eps or max_rounds <= 0:
            return column
        eps = max(eps / EPS_FACTOR, final_eps)


def _auction_phase(benefit, capacity, price, column, held_bid, eps, max_rounds: int) -> int:
    """Bid until every row holds a slot or ``max_rounds`` rounds have run; updates price,
    column and held_bid in place and returns the number of rounds."""
    num_cols = benefit.size(1)
    for rounds in range(max_rounds):
        bidders = torch.nonzero(column < 0).squeeze(1)
        if bidders.numel() == 0:
            return rounds
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
    return max_rounds

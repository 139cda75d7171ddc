"""Routers: pure functions from token-expert scores [T, E] to expert ids [T]."""

from typing import Callable, Dict

import torch
from torch import Tensor

from fairseq_base.assignment import balanced_assignment, greedy_assignment

ROUTERS: Dict[str, Callable[[Tensor], Tensor]] = {
    "balanced": balanced_assignment,
    "greedy": greedy_assignment,
}


def route(scores: Tensor, method: str) -> Tensor:
    """Expert id of every token under ``method`` (a key of ``ROUTERS``)."""
    return ROUTERS[method](scores)


def routing_stats(scores: Tensor, expert_ids: Tensor) -> Dict[str, Tensor]:
    """Share of tokens at their top-1 expert, and the busiest expert's load over the mean load."""
    num_experts = scores.size(1)
    if expert_ids.numel() == 0:
        zero = scores.new_zeros((), dtype=torch.float32)
        return {"top1": zero, "load_max": zero}
    load = torch.bincount(expert_ids, minlength=num_experts).float()
    return {
        "top1": (expert_ids == greedy_assignment(scores)).float().mean(),
        "load_max": load.max() / load.mean(),
    }

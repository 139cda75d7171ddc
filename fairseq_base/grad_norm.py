"""Gradient norm and overflow detection for models with experts, under every fairseq optimizer.

The paper clips by the norm of the shared parameters and rescales every gradient, expert
gradients included, by the same factor. fairseq's ``utils.clip_grad_norm_`` does that for
parameters tagged ``expert``, but ``--fp16`` optimises one flat fp32 copy of all parameters,
which carries no tag: its norm then includes expert gradients, which differ between workers
(so fairseq's cross-worker check fails), and no norm at all looks at expert gradients for
overflow. Here:

- the flat copy keeps the positions of its expert parameters (``expert_slices``), and
- ``clip_grad_norm_with_experts`` takes the norm over shared gradients only (clipping all),
  and returns inf on every worker as soon as an expert gradient on any worker is not
  finite, so that all workers skip the step together (fairseq's overflow semantics).
"""

from types import SimpleNamespace
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist
from fairseq import utils
from fairseq.distributed import utils as distributed_utils
from torch import Tensor

from fairseq_base.experts import is_expert


def expert_slices(params: Sequence[Tensor]) -> List[Tuple[int, int]]:
    """[start, end) ranges of the expert parameters in the flat concatenation of ``params``."""
    slices, offset = [], 0
    for param in params:
        end = offset + param.numel()
        if is_expert(param):
            if slices and slices[-1][1] == offset:
                slices[-1] = (slices[-1][0], end)
            else:
                slices.append((offset, end))
        offset = end
    return slices


def mark_flat_expert_slices(fp32_params: dict, params: Sequence[Tensor]) -> None:
    """Record on each flat fp32 copy (fairseq's FP16Optimizer, one per device) where its experts are."""
    for device, flat in fp32_params.items():
        copied = params if len(fp32_params) == 1 else [p for p in params if p.device.index == device]
        flat.expert_slices = expert_slices(copied)


def shared_and_expert_grads(params) -> Tuple[List[Tensor], List[Tensor]]:
    shared, experts = [], []
    for param in params:
        if getattr(param, "grad", None) is None:
            continue
        grad = param.grad.detach()
        slices = getattr(param, "expert_slices", None)
        if slices is None:
            (experts if is_expert(param) else shared).append(grad)
            continue
        flat, start = grad.view(-1), 0
        for begin, end in slices:
            if begin > start:
                shared.append(flat[start:begin])
            experts.append(flat[begin:end])
            start = end
        if start < flat.numel():
            shared.append(flat[start:])
    return shared, experts


def _sum_over_workers(value: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, group=distributed_utils.get_data_parallel_group())
    return value


def clip_grad_norm_with_experts(params, max_norm: float, aggregate_norm_fn=None) -> Tensor:
    """fairseq's ``clip_grad_norm_`` over the shared gradients, rescaling expert gradients by
    the same factor; inf on every worker if any worker has a non-finite expert gradient."""
    params = list(params)  # fairseq's optimizers hand over a generator
    shared, experts = shared_and_expert_grads(params)
    if not experts:
        return utils.clip_grad_norm_(params, max_norm, aggregate_norm_fn)
    # fairseq's function takes anything with a .grad (and an ``expert`` attribute to leave it out of the norm).
    expert_norm = utils.clip_grad_norm_([SimpleNamespace(grad=g) for g in experts], 0)
    expert_sq = _sum_over_workers(expert_norm.float() ** 2)
    holders = [SimpleNamespace(grad=g) for g in shared] + [SimpleNamespace(grad=g, expert=True) for g in experts]
    norm = utils.clip_grad_norm_(holders, max_norm, aggregate_norm_fn) if shared else expert_norm.new_zeros(())
    # No host synchronisation here: fp16's loss scaler reads the norm anyway.
    return torch.where(torch.isfinite(expert_sq.to(norm.device)), norm, torch.full_like(norm, float("inf")))

"""Optimizers with experts: the gradient norm over shared parameters, and the expert gradients'
reduction over their replicas.

Replaces:
- ``_FP16OptimizerMixin.build_fp32_params`` (``--fp16``, ``--bf16``): fairseq's flat fp32 copy
  of all parameters loses the ``expert`` tag; the copy records where its experts are
  (``grad_norm.mark_flat_expert_slices``).
- ``FairseqOptimizer.clip_grad_norm`` (every optimizer, and the fp32 optimizer inside fairseq's
  fp16 wrappers): the norm that clips and that fairseq compares across workers covers the
  shared parameters only, expert gradients are rescaled by the same factor, and a non-finite
  expert gradient on any worker makes the norm inf on every worker, so that all skip the step
  together (``grad_norm.clip_grad_norm_with_experts``).
- ``FairseqOptimizer.all_reduce_grads`` (every DDP backend and optimizer): after fairseq's
  all-reduce of the shared gradients, each expert's gradient is summed over its W/P
  replicas and divided by W, as DDP divides the shared ones (``ExpertLayout.reduce_expert_grads``);
  and, once per optimizer step as fairseq calls it, the step's routing statistics are summed over
  the workers and logged, and the lossfree router's bias moves toward the under-loaded experts
  (``reduce_routing_stats``).
Touches: models with experts. Without experts the flat copy records no slices, the norm is
fairseq's own ``clip_grad_norm``, and there is nothing to reduce.
"""

from fairseq.optim import FairseqOptimizer
from fairseq.optim.fp16_optimizer import _FP16OptimizerMixin
from torch import nn

from fairseq_base.experts import is_expert
from fairseq_base.grad_norm import clip_grad_norm_with_experts, mark_flat_expert_slices
from fairseq_base.layer import reduce_expert_grads, reduce_routing_stats

FAIRSEQ_BUILD_FP32_PARAMS = _FP16OptimizerMixin.build_fp32_params.__func__
FAIRSEQ_ALL_REDUCE_GRADS = FairseqOptimizer.all_reduce_grads
FAIRSEQ_CLIP_GRAD_NORM = FairseqOptimizer.clip_grad_norm


def holds_experts(params) -> bool:
    """Parameters of a model with experts, or fairseq's flat fp32 copy of them (``build_fp32_params``)."""
    return any(is_expert(param) or getattr(param, "expert_slices", None) for param in params)


def build_fp32_params(cls, args, params, flatten=True):
    fp32_params = FAIRSEQ_BUILD_FP32_PARAMS(cls, args, params, flatten)
    if flatten and holds_experts(params):
        mark_flat_expert_slices(fp32_params, params)
    return fp32_params


def clip_grad_norm(self, *args, **kwargs):  # as fairseq's: (max_norm, aggregate_norm_fn=None)
    if not holds_experts(self.params):
        return FAIRSEQ_CLIP_GRAD_NORM(self, *args, **kwargs)
    return clip_grad_norm_with_experts(self.params, *args, **kwargs)


def all_reduce_grads(self, module):
    reduced = FAIRSEQ_ALL_REDUCE_GRADS(self, module)
    if isinstance(module, nn.Module):
        reduce_expert_grads(module)
        reduce_routing_stats(module)
    return reduced


def install() -> None:
    _FP16OptimizerMixin.build_fp32_params = classmethod(build_fp32_params)
    FairseqOptimizer.clip_grad_norm = clip_grad_norm
    FairseqOptimizer.all_reduce_grads = all_reduce_grads

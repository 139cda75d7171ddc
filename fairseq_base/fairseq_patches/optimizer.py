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
- ``AMPOptimizer.build_optimizer`` (``--amp``): with experts on several workers, one line
  instead: torch's GradScaler skips a step from each worker's own overflow check, so one worker
  could skip (an overflow in its own expert gradients) while the others step. Checked in every
  worker as it builds its optimizer, on every launch path: fairseq-hydra-train imports the plugin
  only in each worker's ``train.main``, after launch, where ``launch.check_amp`` never ran.
Touches: models with experts. Without experts the flat copy records no slices, the norm is
fairseq's own ``clip_grad_norm``, there is nothing to reduce, and ``--amp`` builds as before.
"""

from fairseq.optim import FairseqOptimizer
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.optim.fp16_optimizer import _FP16OptimizerMixin
from torch import nn

from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.experts import is_expert
from fairseq_base.grad_norm import clip_grad_norm_with_experts, mark_flat_expert_slices
from fairseq_base.layer import reduce_expert_grads, reduce_routing_stats

FAIRSEQ_BUILD_FP32_PARAMS = _FP16OptimizerMixin.build_fp32_params.__func__
FAIRSEQ_ALL_REDUCE_GRADS = FairseqOptimizer.all_reduce_grads
FAIRSEQ_CLIP_GRAD_NORM = FairseqOptimizer.clip_grad_norm
FAIRSEQ_BUILD_AMP_OPTIMIZER = AMPOptimizer.build_optimizer.__func__


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


def refuse_amp_on_workers(cfg, experts: bool) -> None:
    if cfg.common.amp and experts and cfg.distributed_training.distributed_world_size > 1:
        raise BaseLayerConfigError(
            "--amp with experts on several workers could let one worker skip a step (an overflow in its own "
            "expert gradients) while the others take it; train with --bf16 (A100, H100 and newer) or --fp16, "
            "whose overflows make every worker skip together")


def build_amp_optimizer(cls, cfg, params, **kwargs):  # as fairseq's AMPOptimizer.build_optimizer
    params = list(params)
    refuse_amp_on_workers(cfg, holds_experts(params))
    return FAIRSEQ_BUILD_AMP_OPTIMIZER(cls, cfg, params, **kwargs)


def install() -> None:
    AMPOptimizer.build_optimizer = classmethod(build_amp_optimizer)
    _FP16OptimizerMixin.build_fp32_params = classmethod(build_fp32_params)
    FairseqOptimizer.clip_grad_norm = clip_grad_norm
    FairseqOptimizer.all_reduce_grads = all_reduce_grads

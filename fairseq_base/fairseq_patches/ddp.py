"""DDP backends with experts: experts are never averaged across workers.

Replaces:
- ``fairseq.models.DistributedFairseqModel``: with experts, refuse every backend that would
  average them (only ``c10d``/``pytorch_ddp`` and ``legacy_ddp``/``no_c10d`` are safe), and
  tell torch's DDP to leave the expert parameters and their ``expert_ids`` buffers out of its
  bucketed all-reduce (and out of its broadcast of rank 0's state at start); they are reduced
  over their replicas after the backward pass (``optimizer.py``). ``legacy_ddp`` skips
  parameters tagged ``expert`` by itself.
- ``DistributedDataParallel`` as ``fairseq.models.distributed_fairseq_model`` builds it: for a
  module on the CPU, without the device id fairseq always passes (torch refuses one there).
Touches: W > 1 workers only (fairseq wraps no model in one process). The expert checks act on
models with experts; the device id is dropped for every model on the CPU, where fairseq's
c10d would otherwise fail, and left for every model on a GPU.
"""

from fairseq import models
from fairseq.models import distributed_fairseq_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.experts import EXPERT_IDS, is_expert
from fairseq_base.fairseq_patches.which_models import has_expert_options, has_experts

TORCH_DDP_BACKENDS = ("c10d", "pytorch_ddp")  # told to ignore the experts (``ignore_experts_in_torch_ddp``)
EXPERT_SAFE_DDP_BACKENDS = ("legacy_ddp", "no_c10d") + TORCH_DDP_BACKENDS  # legacy_ddp skips params tagged ``expert``
FAIRSEQ_WRAP_MODEL = models.DistributedFairseqModel


def check_sharding(cfg) -> None:
    """Before launch (``launch.call_main``): fairseq's fully_sharded wraps the whole model in FSDP."""
    if cfg.distributed_training.ddp_backend == "fully_sharded" and has_expert_options(cfg.model):
        raise BaseLayerConfigError(
            "--ddp-backend fully_sharded would shard the experts like shared parameters (and needs fairscale); "
            "use --ddp-backend c10d or legacy_ddp")


def check_ddp_backend(args, model) -> None:
    if has_experts(model) and args.ddp_backend not in EXPERT_SAFE_DDP_BACKENDS:
        raise BaseLayerConfigError(
            f"--ddp-backend {args.ddp_backend} would average the experts of different workers; "
            f"use --ddp-backend c10d or legacy_ddp")


def ignore_experts_in_torch_ddp(args, model) -> None:
    """torch's DDP would average the experts of different workers (and overwrite them with rank 0's
    at start); leave them, and the buffers naming them, to the replica reduction."""
    if args.ddp_backend in TORCH_DDP_BACKENDS and has_experts(model):
        names = [name for name, param in model.named_parameters() if is_expert(param)]
        names += [name for name, _ in model.named_buffers() if name.endswith(EXPERT_IDS)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def wrap_model(args, model, process_group, device):
    check_ddp_backend(args, model)
    ignore_experts_in_torch_ddp(args, model)
    return FAIRSEQ_WRAP_MODEL(args, model, process_group, device)


def torch_ddp(module, device_ids=None, output_device=None, **kwargs):
    """torch's DDP as fairseq builds it, for modules on the CPU too (fairseq always passes a device id)."""
    if isinstance(module, nn.Module) and next(module.parameters()).device.type == "cpu":
        device_ids = output_device = None
    return DistributedDataParallel(module, device_ids=device_ids, output_device=output_device, **kwargs)


def install() -> None:
    models.DistributedFairseqModel = wrap_model
    distributed_fairseq_model.DistributedDataParallel = torch_ddp

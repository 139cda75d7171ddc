"""The two adjustments this plugin makes to fairseq, installed when the plugin is imported.

1. ``torchrun`` on a machine without CUDA devices: fairseq's launch inference divides by
   ``torch.cuda.device_count()`` (0) and, with the default --distributed-world-size of 1, never
   looks at torchrun's environment. Here that case takes the world size and rank from the
   environment; every other case is left to fairseq.
2. A DDP backend that all-reduces every gradient would average the experts of different
   workers. Wrapping a model that holds BASE layers in such a backend is refused, before the
   first update, with the option to use instead.
"""

import os

import torch
from fairseq import models
from fairseq.distributed import utils as distributed_utils

from fairseq_base.errors import BaseLayerConfigError

TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")
EXPERT_SAFE_DDP_BACKENDS = ("legacy_ddp", "no_c10d")  # both skip params tagged ``expert``


def infer_cpu_torchrun_init(cfg) -> bool:
    """Fill in ``cfg`` (distributed_training) for torchrun without CUDA; False if that is not the case."""
    if cfg.distributed_init_method is not None or torch.cuda.device_count() > 0:
        return False
    if not all(key in os.environ for key in TORCHRUN_ENV):
        return False
    cfg.distributed_init_method = "env://"
    cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
    cfg.distributed_rank = int(os.environ["RANK"])
    cfg.device_id = int(os.environ["LOCAL_RANK"])
    cfg.distributed_no_spawn = True  # torchrun started the processes
    return True


def check_ddp_backend(args, model) -> None:
    from fairseq_base.layer import BaseLayer

    has_experts = any(isinstance(m, BaseLayer) for m in model.modules())
    if has_experts and args.ddp_backend not in EXPERT_SAFE_DDP_BACKENDS:
        raise BaseLayerConfigError(
            f"--ddp-backend {args.ddp_backend} would average the experts of different workers; "
            f"use --ddp-backend legacy_ddp")


def install() -> None:
    if getattr(distributed_utils.infer_init_method, "fairseq_base", False):
        return
    fairseq_infer_init_method = distributed_utils.infer_init_method
    fairseq_wrap_model = models.DistributedFairseqModel

    def infer_init_method(cfg, force_distributed=False):
        if not infer_cpu_torchrun_init(cfg):
            fairseq_infer_init_method(cfg, force_distributed)

    def wrap_model(args, model, process_group, device):
        check_ddp_backend(args, model)
        return fairseq_wrap_model(args, model, process_group, device)

    infer_init_method.fairseq_base = True
    distributed_utils.infer_init_method = infer_init_method
    models.DistributedFairseqModel = wrap_model

"""Launch: torchrun without CUDA devices, ``--bf16`` without TPUs, options checked before launch.

Replaces:
- ``distributed_utils.infer_init_method``: fairseq's launch inference divides by
  ``torch.cuda.device_count()`` (0 on a CPU machine) and, with the default
  --distributed-world-size of 1, never looks at torchrun's environment. Under torchrun on a
  machine without CUDA devices, the world size and rank come from the environment; every
  other case is left to fairseq.
- ``distributed_utils.call_main``: fairseq's command line turns on ``--tpu`` with ``--bf16``,
  which fails without torch_xla (on CPU in ``distributed_init``) and would take the XLA path
  on GPUs; where torch_xla is not installed, ``--bf16`` trains on the CPU or GPU instead,
  through fairseq's FP16Optimizer as on a TPU (fp32 master weights, no loss scaling). And
  ``--ddp-backend fully_sharded`` with experts stops with one line (``ddp.check_sharding``).
Touches: every model, on the launch paths named: torchrun without CUDA (where fairseq fails),
``--bf16`` without torch_xla (where fairseq fails). Everything else goes to fairseq unchanged.
"""

import importlib.util
import os

import torch
from fairseq.distributed import utils as distributed_utils
from omegaconf import DictConfig

from fairseq_base.fairseq_patches.ddp import check_sharding

TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")
FAIRSEQ_INFER_INIT_METHOD = distributed_utils.infer_init_method
FAIRSEQ_CALL_MAIN = distributed_utils.call_main


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


def infer_init_method(cfg, force_distributed=False):
    if not infer_cpu_torchrun_init(cfg):
        FAIRSEQ_INFER_INIT_METHOD(cfg, force_distributed)


def bf16_without_tpu(cfg) -> None:
    """Undo the --tpu that fairseq's command line sets for --bf16 where there can be no TPU (in
    every config group: the command line copies it into distributed_training too)."""
    if cfg.common.bf16 and cfg.common.tpu and importlib.util.find_spec("torch_xla") is None:
        for name in cfg:
            group = cfg[name]
            if isinstance(group, DictConfig) and group.get("tpu") is True:
                group.tpu = False


def call_main(cfg, main, **kwargs):
    bf16_without_tpu(cfg)
    check_sharding(cfg)
    return FAIRSEQ_CALL_MAIN(cfg, main, **kwargs)


def install() -> None:
    distributed_utils.infer_init_method = infer_init_method
    distributed_utils.call_main = call_main

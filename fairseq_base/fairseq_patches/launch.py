"""Launch: fairseq's launch paths on machines without CUDA devices, ``--bf16`` without TPUs,
options checked before launch.

Replaces:
- ``distributed_utils.infer_init_method``: fairseq's launch inference divides by
  ``torch.cuda.device_count()`` (0 on a CPU machine). Under torchrun on a machine without
  CUDA devices (where, with the default --distributed-world-size of 1, fairseq never looks at
  torchrun's environment), the world size and rank come from the environment. With
  --distributed-world-size N > 1 and no torchrun (fairseq's one-process-per-GPU launch, where
  fairseq asserts N GPUs), N processes are spawned on this host's CPU. Either way without CUDA
  the backend is gloo (nccl needs GPUs). Every other case is left to fairseq.
- ``distributed_utils.call_main``: spawns those N CPU processes (fairseq would spawn one per
  GPU: none); fairseq's command line turns on ``--tpu`` with ``--bf16``, which fails without
  torch_xla (on CPU in ``distributed_init``) and would take the XLA path on GPUs; where
  torch_xla is not installed, ``--bf16`` trains on the CPU or GPU instead, through fairseq's
  FP16Optimizer as on a TPU (fp32 master weights, no loss scaling). Before launch, with
  experts: ``--ddp-backend fully_sharded`` stops with one line (``ddp.check_sharding``), and so
  does ``--amp`` on several workers (``optimizer.refuse_amp_on_workers``).
- ``distributed_utils.distributed_main``, in each process fairseq's spawn launch starts (on CPU
  and GPU alike): fairseq makes a ``multiprocessing.Lock`` when imported (``fairseq/pdb.py``),
  and a spawned process imports fairseq while it unpickles its task, before multiprocessing
  drops the finalizers it was handed, the lock's among them; the lock's semaphore was then
  never unlinked, and the run ended with "resource_tracker: There appear to be N leaked
  semaphore objects". The lock gets its finalizer back, and the process starts its DataLoader
  workers by fork, as it would under torchrun or in one process (spawned workers import fairseq
  too, and nothing of the plugin runs there to give their lock back its finalizer).
Touches: every model, only where fairseq would fail: torchrun or --distributed-world-size N on
a machine without CUDA devices, ``--bf16`` without torch_xla. The checks: models with experts.
Every model: a command that fails removes the empty save directory it made (``no_empty_save_dir_left``);
under the spawn launch a worker's one-line error ends the output (``worker_errors_raised_here``).
Everything else goes to fairseq unchanged.
"""

import contextlib
import importlib.util
import logging
import multiprocessing
import os
import socket
import sys
from multiprocessing import synchronize, util

import torch
from fairseq.distributed import utils as distributed_utils
from omegaconf import DictConfig

from fairseq_base.errors import raised_by_a_worker
from fairseq_base.fairseq_patches.ddp import check_sharding
from fairseq_base.fairseq_patches.optimizer import refuse_amp_on_workers
from fairseq_base.fairseq_patches.which_models import has_expert_options

logger = logging.getLogger(__name__)

TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")
FAIRSEQ_INFER_INIT_METHOD = distributed_utils.infer_init_method
FAIRSEQ_CALL_MAIN = distributed_utils.call_main
FAIRSEQ_DISTRIBUTED_MAIN = distributed_utils.distributed_main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_without_cuda(cfg) -> None:
    if cfg.distributed_backend == "nccl":
        logger.info("fairseq_base: --distributed-backend gloo (no CUDA devices for nccl)")
        cfg.distributed_backend = "gloo"


def infer_cpu_init(cfg) -> bool:
    """Fill in ``cfg`` (distributed_training) for torchrun, or for N > 1 processes spawned here,
    on a machine without CUDA devices; False if that is not the case."""
    if cfg.distributed_init_method is not None or torch.cuda.device_count() > 0:
        return False
    if all(key in os.environ for key in TORCHRUN_ENV):
        cfg.distributed_init_method = "env://"
        cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
        cfg.distributed_rank = int(os.environ["RANK"])
        cfg.device_id = int(os.environ["LOCAL_RANK"])
        cfg.distributed_no_spawn = True  # torchrun started the processes
    elif cfg.distributed_world_size > 1 and "SLURM_STEP_NODELIST" not in os.environ and not cfg.distributed_no_spawn:
        port = cfg.distributed_port if cfg.distributed_port > 0 else free_port()
        cfg.distributed_init_method = f"tcp://localhost:{port}"
        cfg.distributed_num_procs = cfg.distributed_world_size
    else:
        return False
    gloo_without_cuda(cfg)
    return True


def infer_init_method(cfg, *args, **kwargs):  # as fairseq's: (cfg, force_distributed=False)
    if not infer_cpu_init(cfg):
        return FAIRSEQ_INFER_INIT_METHOD(cfg, *args, **kwargs)


def spawn_on_cpu(cfg, main, **kwargs) -> None:
    """fairseq's spawn launch with one process per worker instead of one per GPU (as its call_main)."""
    start_rank = cfg.distributed_training.distributed_rank
    cfg.distributed_training.distributed_rank = None  # distributed_main numbers them from start_rank
    torch.multiprocessing.spawn(fn=distributed_main, args=(main, cfg, {**kwargs, "start_rank": start_rank}),
                                nprocs=cfg.distributed_training.distributed_world_size, join=True)


def check_amp(cfg) -> None:
    """Before launch, from the options; each worker checks again as it builds its optimizer
    (``optimizer.build_amp_optimizer``), on launch paths that import the plugin only after launch."""
    refuse_amp_on_workers(cfg, has_expert_options(cfg.model))


def bf16_without_tpu(cfg) -> None:
    """Undo the --tpu that fairseq's command line sets for --bf16 where there can be no TPU (in
    every config group: the command line copies it into distributed_training too)."""
    if cfg.common.bf16 is True and cfg.common.tpu is True and importlib.util.find_spec("torch_xla") is None:
        for name in cfg:
            group = cfg[name]
            if isinstance(group, DictConfig) and group.get("tpu") is True:
                group.tpu = False


def finalize_fairseq_lock() -> None:
    """Give ``fairseq.pdb``'s lock back the finalizer that unlinks its semaphore at exit, unless it has one."""
    lock = getattr(sys.modules.get("fairseq.pdb"), "_stdin_lock", None)
    name = getattr(getattr(lock, "_semlock", None), "name", None)  # None: unlinked at creation (fork)
    registry = getattr(util, "_finalizer_registry", None)
    if name is None or registry is None or not hasattr(synchronize.SemLock, "_cleanup"):
        return
    if not any(getattr(finalizer, "_args", None) == (name,) for finalizer in list(registry.values())):
        util.Finalize(lock, synchronize.SemLock._cleanup, (name,), exitpriority=0)


def distributed_main(i, main, cfg, kwargs):  # as fairseq's, in each process its spawn launch starts
    finalize_fairseq_lock()
    if multiprocessing.get_start_method(allow_none=True) == "spawn":
        multiprocessing.set_start_method("fork", force=True)  # the DataLoader workers', as under torchrun
    return FAIRSEQ_DISTRIBUTED_MAIN(i, main, cfg, kwargs)


def call_main(cfg, main, **kwargs):
    with no_empty_save_dir_left(cfg), worker_errors_raised_here():
        bf16_without_tpu(cfg)
        check_sharding(cfg)
        distributed = cfg.distributed_training
        if distributed.distributed_init_method is None:
            infer_init_method(distributed)
        check_amp(cfg)
        if distributed.distributed_init_method is not None and not distributed.distributed_no_spawn \
                and torch.cuda.device_count() == 0 and distributed.distributed_world_size > 1:
            return spawn_on_cpu(cfg, main, **kwargs)
        return FAIRSEQ_CALL_MAIN(cfg, main, **kwargs)


@contextlib.contextmanager
def worker_errors_raised_here():
    """fairseq's spawn launch (on CPU and GPU): a worker's one-line error is raised again in the
    parent, whose excepthook prints the line, rather than torch's ProcessRaisedException with the
    worker's traceback after it."""
    try:
        yield
    except torch.multiprocessing.ProcessRaisedException as failure:
        error = raised_by_a_worker(str(failure))
        if error is None:
            raise
        raise error from None


@contextlib.contextmanager
def no_empty_save_dir_left(cfg):
    """A command that fails removes the save directory it made (fairseq makes it before anything
    can refuse the run) while it is still empty, with the folders it made above it."""
    save_dir = os.path.abspath(cfg.checkpoint.save_dir) if cfg.get("checkpoint") and cfg.checkpoint.save_dir else None
    made = []  # the folders this command would make, deepest first
    folder = save_dir
    while folder and not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        yield
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):  # not empty, or already gone: kept as it is
                os.rmdir(folder)
        raise


def install() -> None:
    distributed_utils.infer_init_method = infer_init_method
    distributed_utils.call_main = call_main
    distributed_utils.distributed_main = distributed_main

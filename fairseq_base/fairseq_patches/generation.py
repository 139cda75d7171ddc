"""fairseq-interactive and fairseq-generate on W workers, each holding only its experts.

Replaces ``fairseq_cli.interactive.main`` and ``fairseq_cli.generate.main`` (the Python entry
points too, which also take an argparse Namespace):
- with a model with experts on W > 1 workers (torchrun, or ``--distributed-world-size N``;
  fairseq-generate, which fairseq runs in each process alone, first goes through fairseq's
  launcher, ``call_main``, as fairseq-interactive already does), worker r loads its own file of
  ``--path NAME.pt`` saved as NAME-rank-*.pt, as fairseq-eval-lm does
  (``eval_lm.rank_suffix_for_eval``; each worker reads its file before the first collective).
  Worker 0 runs fairseq's command as one process would: it alone reads the prompts (stdin or
  ``--input``; fairseq-generate's whole split) and prints, in input order; the other workers
  serve its forwards with their experts (``lockstep.py``). An exception on one worker stops
  every worker with its line;
- with a model with experts on any number of workers, a ``--model-overrides`` that names no
  option of the model, or asks for a router (or expert layers) other than the checkpoint holds,
  is one line (fairseq would fail in loading, with a traceback).
Both are module-level functions, so that fairseq's spawn launch can pickle ``main``.
Touches: models with experts; every other run is fairseq's, unchanged.
"""

import ast
import contextlib
import os
from argparse import Namespace

import torch
import torch.distributed as dist
from fairseq import checkpoint_utils, tasks, utils
from fairseq.distributed import utils as distributed_utils
from fairseq_cli import generate, interactive
from omegaconf import DictConfig

from fairseq_base import checkpoints
from fairseq_base.fairseq_patches.eval_lm import rank_suffix_for_eval, read_own_files_together
from fairseq_base.fairseq_patches.which_models import as_config, is_expert_model
from fairseq_base.lockstep import Together

FAIRSEQ_INTERACTIVE_MAIN = interactive.main
FAIRSEQ_GENERATE_MAIN = generate.main


def saved_models(cfg) -> list:
    """The model config of each --path checkpoint (of NAME-rank-0.pt for NAME.pt), None where unreadable."""
    models = []
    for path in cfg.common_eval.path.split(os.pathsep) if cfg.common_eval.path else []:
        found = path if os.path.exists(path) else next(iter(checkpoints.rank_files(path)), None)
        model = (checkpoints.saved_config(found) or {}).get("model") if found else None
        models.append(Namespace(**model) if isinstance(model, dict) else None)
    return models


def experts_on_workers(cfg, models) -> bool:
    """Several workers (torchrun's, or fairseq's launch of N) and a checkpoint with experts."""
    workers = max(cfg.distributed_training.distributed_world_size, int(os.environ.get("WORLD_SIZE", "1")))
    return workers > 1 and any(is_expert_model(model) for model in models)


# The options that decide which parameters a model has: its checkpoint holds the ones it was built with.
BUILT_WITH = ("base_router", "base_experts", "base_layers", "base_moe_freq", "base_sublayers", "base_hash",
              "base_positions")


def check_overrides(cfg, saved) -> None:
    """One line for a --model-overrides that names no option of the model, or asks a checkpoint
    with experts for a router (or expert layers) other than those it holds."""
    overrides = ast.literal_eval(cfg.common_eval.model_overrides)
    for key, value in overrides.items():
        if key.startswith("base_") and not hasattr(saved, key):
            raise checkpoints.CheckpointError(
                f"--model-overrides {key}: no option of transformer_lm_base by that name "
                f"(python -m fairseq_base.options lists them)")
        if key in BUILT_WITH and value != getattr(saved, key):
            raise checkpoints.CheckpointError(
                f"--model-overrides {key}={value!r}: the checkpoint holds the parameters of {key}="
                f"{getattr(saved, key)!r} and has none for {value!r}; drop the override (a router or expert layers "
                f"of another kind need a model trained, or upcycled, with them)")


def served_models(cfg):
    """The models of ``--path``, loaded and placed for generation as fairseq's commands place them."""
    task = tasks.setup_task(cfg.task)
    models, _ = checkpoint_utils.load_model_ensemble(
        utils.split_paths(cfg.common_eval.path), arg_overrides=ast.literal_eval(cfg.common_eval.model_overrides),
        task=task, suffix=cfg.checkpoint.checkpoint_suffix)
    for model in models:
        if cfg.common.fp16:
            model.half()
        if torch.cuda.is_available() and not cfg.common.cpu:
            model.cuda()
        model.prepare_for_inference_(cfg)
    return models


@contextlib.contextmanager
def loading_into(together: Together):
    """fairseq's command adds each model it loads to ``together``."""
    def load_and_add(*args, **kwargs):
        loaded = fairseq_load(*args, **kwargs)
        together.add(loaded[0])
        return loaded

    fairseq_load = checkpoint_utils.load_model_ensemble
    checkpoint_utils.load_model_ensemble = load_and_add
    try:
        yield
    finally:
        checkpoint_utils.load_model_ensemble = fairseq_load


def on_workers(fairseq_main, cfg, **kwargs):
    """``fairseq_main`` on worker 0, as one process would run it, while the others serve."""
    cfg = as_config(cfg)
    rank, workers = cfg.distributed_training.distributed_rank, cfg.distributed_training.distributed_world_size
    for path in cfg.common_eval.path.split(os.pathsep):
        checkpoints.refuse_two_kinds(path, "move one of them to another directory, so that --path names one model")
    rank_suffix_for_eval(cfg, rank, workers)
    read_own_files_together(cfg, workers)
    utils.import_user_module(cfg.common)
    if rank != 0:
        with Together(served_models(cfg)):
            return None
    # Worker 0 reads and writes everything: fairseq-generate takes the whole split, not a shard.
    cfg.distributed_training.distributed_world_size, cfg.distributed_training.distributed_rank = 1, 0
    with Together() as together, loading_into(together):
        return fairseq_main(cfg, **kwargs)


def checked(cfg):
    """``cfg`` as a config, its --model-overrides checked where its checkpoint has experts, and
    whether it asks for experts on several workers."""
    cfg = as_config(cfg)
    models = saved_models(cfg)
    for model in models:
        if is_expert_model(model):
            check_overrides(cfg, model)
    return cfg, experts_on_workers(cfg, models)


def interactive_main(cfg, **kwargs):
    if not isinstance(cfg, (Namespace, DictConfig)):
        return FAIRSEQ_INTERACTIVE_MAIN(cfg, **kwargs)
    cfg, on_several = checked(cfg)
    if on_several:
        return on_workers(FAIRSEQ_INTERACTIVE_MAIN, cfg, **kwargs)
    return FAIRSEQ_INTERACTIVE_MAIN(cfg, **kwargs)


def generate_main(cfg, **kwargs):
    if not isinstance(cfg, (Namespace, DictConfig)):
        return FAIRSEQ_GENERATE_MAIN(cfg, **kwargs)
    cfg, on_several = checked(cfg)
    if not on_several:
        return FAIRSEQ_GENERATE_MAIN(cfg, **kwargs)
    if not dist.is_initialized():  # fairseq-generate runs each process alone: launch the workers
        return distributed_utils.call_main(cfg, generate_main, **kwargs)
    return on_workers(FAIRSEQ_GENERATE_MAIN, cfg, **kwargs)


def install() -> None:
    interactive.main = interactive_main
    generate.main = generate_main

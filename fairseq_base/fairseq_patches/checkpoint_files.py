"""Checkpoint files: one per expert-parallel rank, checked on load and on save, and loadable
under torch's ``weights_only=True``.

Replaces:
- ``Trainer.__init__``: for transformer_lm_base with experts, write E and P as numbers (not
  0) into the configuration that checkpoints save, so that files never depend on the world
  size, and on W > 1 workers name worker r's file ``NAME-rank-{r % P}.pt`` (for BASE layers
  and expert FFNs alike; fairseq names files per rank only for ``--base-layers``). Here, not in
  ``distributed_init``: fairseq's spawn launch runs that before the plugin is imported.
- ``Trainer.should_save_checkpoint_on_current_rank``: the first P workers write those files
  (their replicas hold the same experts).
- ``Trainer.state_dict``: every checkpoint of a model with experts carries the run id and its
  update.
- ``checkpoint_utils.load_checkpoint_to_cpu``: a checkpoint of a model with experts is refused
  if a tensor holds inf or NaN, and one written before the experts were stacked is read as
  if written now, optimizer state included (``old_checkpoints.upgrade``); every loaded
  file's run id and update are remembered. A file that every worker already read in full
  (``Trainer.load_checkpoint`` below) is not read again.
- ``checkpoint_utils.load_model_ensemble_and_task`` (every ``--path``: eval-lm, generate,
  interactive, ``from_pretrained``): a path that does not exist, in one process, beside the
  ``-rank-*`` files of a run on several workers is one line naming them and the two ways to use
  them, and any other path that does not exist is one line too, instead of fairseq's "Model
  file not found" traceback (for every model: only where fairseq fails).
- ``checkpoint_utils.load_checkpoint_to_cpu`` also turns a file that cannot be read (empty,
  truncated, corrupt) into one line naming it, for every model, instead of torch's traceback.
- ``Trainer.load_checkpoint``, for models with experts (resume, ``--restore-file``): decide
  together, then act. Every worker first reads its own file in full and the workers gather
  what each found (missing, unreadable, inf or NaN, run id, update) before any of them calls
  into fairseq's loading, whose first touch of ``trainer.model`` is a collective on torch's
  DDP. They load only a file that every worker can read and that belongs to one save; else,
  when resuming from ``checkpoint_last`` (a kill during or between the workers' saves, a
  damaged file), the newest ``checkpoint_E_U`` set that is so on every worker, saying so in
  one line; with none, or for an explicit ``--restore-file``, all stop with one line. After
  fairseq's loading they compare a checksum of the shared parameters, and an exception on one
  worker stops every worker with its line.
- ``torch.load``'s allowed globals: fairseq stores an ``argparse.Namespace`` in the
  configuration of checkpoints of its legacy components (``--optimizer sgd``, for example),
  which torch >= 2.6 refuses under its default ``weights_only=True``. That one class is
  allowed (a Namespace runs no code when unpickled); ``weights_only`` stays on.
Touches: the per-rank files, the finite check, the run stamp and the loading together act on
models with experts only. For every model, a file that cannot be read is one line where
fairseq would raise torch's error, and the Namespace is allowed where fairseq could not load
the checkpoint otherwise.
"""

import argparse
import logging
import os
import pickle
import re
import zipfile
from typing import Dict, List, Optional

import torch
from fairseq import checkpoint_utils
from fairseq.trainer import Trainer

from fairseq_base import checkpoints, old_checkpoints
from fairseq_base.fairseq_patches.which_models import as_config, has_expert_options, has_experts, is_expert_model
from fairseq_base.groups import resolve_expert_parallel_size, resolve_num_experts
from fairseq_base.errors import BaseLayerConfigError

logger = logging.getLogger(__name__)
FAIRSEQ_TRAINER_INIT = Trainer.__init__
FAIRSEQ_SHOULD_SAVE = Trainer.should_save_checkpoint_on_current_rank
FAIRSEQ_LOAD_CHECKPOINT_TO_CPU = checkpoint_utils.load_checkpoint_to_cpu
FAIRSEQ_LOAD_MODEL_ENSEMBLE_AND_TASK = checkpoint_utils.load_model_ensemble_and_task
FAIRSEQ_TRAINER_LOAD_CHECKPOINT = Trainer.load_checkpoint
FAIRSEQ_TRAINER_STATE_DICT = Trainer.state_dict
# Checkpoints every worker has read in full before fairseq's loading (``read_own_file``), by
# absolute path: fairseq's own read of the chosen file takes its state from here.
READ_AHEAD: Dict[str, dict] = {}


def expert_parallel_checkpoints(cfg) -> None:
    """Write E and P into the configuration that checkpoints save and, on W > 1 workers, name
    worker r's checkpoint NAME-rank-{r % P}.pt (which only workers r < P write)."""
    if not is_expert_model(cfg.model):
        return
    workers = cfg.distributed_training.distributed_world_size
    size = resolve_expert_parallel_size(cfg.model.base_expert_parallel_size, workers)
    cfg.model.base_experts = resolve_num_experts(cfg.model.base_experts, size)
    cfg.model.base_expert_parallel_size = size
    if workers > 1:
        cfg.checkpoint.checkpoint_suffix = f"-rank-{cfg.distributed_training.distributed_rank % size}"
        cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True


def trainer_init(self, cfg, *args, **kwargs):
    cfg = as_config(cfg)
    expert_parallel_checkpoints(cfg)
    return FAIRSEQ_TRAINER_INIT(self, cfg, *args, **kwargs)


def should_save_checkpoint_on_current_rank(self) -> bool:
    if is_expert_model(self.cfg.model) and self.data_parallel_world_size > 1:
        return self.data_parallel_rank < self.cfg.model.base_expert_parallel_size
    return FAIRSEQ_SHOULD_SAVE.fget(self)


def trainer_state_dict(self):
    state = FAIRSEQ_TRAINER_STATE_DICT(self)
    if has_experts(self.get_model()):
        checkpoints.stamp(state, getattr(self, "fairseq_base_run_id", None), self.get_num_updates())
    return state


def load_checkpoint_to_cpu(path, *args, **kwargs):  # as fairseq's: (path, arg_overrides=None, load_on_all_ranks=False)
    overrides = args[0] if args else kwargs.get("arg_overrides")
    if not overrides and os.path.abspath(path) in READ_AHEAD:
        return READ_AHEAD.pop(os.path.abspath(path))  # read in full by ``read_own_file``
    try:
        state = FAIRSEQ_LOAD_CHECKPOINT_TO_CPU(path, *args, **kwargs)
    except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        if not os.path.isfile(path):
            raise
        raise checkpoints.unreadable(path, err) from None
    saved_cfg = state.get("cfg")
    if has_expert_options(saved_cfg.get("model") if saved_cfg else None):
        checkpoints.check_finite(state, path)
        old_checkpoints.upgrade(state)
    checkpoints.remember(path, state)
    return state


def load_model_ensemble_and_task(filenames, *args, **kwargs):
    suffix = kwargs.get("suffix", args[3] if len(args) > 3 else "")
    for filename in filenames if not suffix else []:
        if not os.path.exists(filename):
            checkpoints.refuse_plain_name_of_rank_files(filename)
    try:
        return FAIRSEQ_LOAD_MODEL_ENSEMBLE_AND_TASK(filenames, *args, **kwargs)
    except OSError as err:
        if not str(err).startswith("Model file not found: "):
            raise
        raise checkpoints.CheckpointError(f"--path {str(err).split(': ', 1)[1]}: no such checkpoint; pass the path of "
                                          f"a checkpoint_*.pt that fairseq-train wrote (relative paths are read from "
                                          f"the current directory)") from None


def read_own_file(path: str, workers: int) -> dict:
    """What this worker finds at ``path``, read in full as fairseq would read it (its state kept
    in ``READ_AHEAD`` for fairseq's own read): {"exists", "problem", "run_id", "num_updates"}."""
    record = {"exists": os.path.isfile(path), "problem": None, "run_id": None, "num_updates": None, "file": path}
    if not record["exists"]:
        return record
    try:
        state = load_checkpoint_to_cpu(path, load_on_all_ranks=workers > 1)
    except Exception as err:  # whatever a damaged file makes the readers raise: all workers decide on it together
        record["problem"] = str(err) if isinstance(err, checkpoints.CheckpointError) else \
            f"{path} cannot be loaded ({type(err).__name__}: {checkpoints.first_line(err)})"
        return record
    READ_AHEAD[os.path.abspath(path)] = state
    record.update(checkpoints.provenance(state))
    return record


def problem_with(records: List[dict]) -> Optional[str]:
    """Why the workers cannot load the files of ``records`` (one per worker, by rank) together,
    or None: each can read its own and they belong to one save, or none of them exists (a new run)."""
    missing = [rank for rank, record in enumerate(records) if not record["exists"]]
    if missing and len(missing) < len(records):
        return f"{records[missing[0]]['file']} does not exist on worker {missing[0]} (the other workers have theirs)"
    return next((record["problem"] for record in records if record["problem"]), None) or \
        checkpoints.disagreement(records)


def resuming(trainer, filename: str) -> bool:
    """``filename`` is the run's own ``checkpoint_last`` (not an explicit --restore-file)."""
    last = os.path.join(trainer.cfg.checkpoint.save_dir, f"checkpoint_last{trainer.checkpoint_suffix}.pt")
    return os.path.abspath(filename) == os.path.abspath(last)


def sets_on_every_worker(trainer, everyone) -> List[str]:
    """The ``checkpoint_E_U`` files (this worker's, by its suffix) of the saves that every worker
    has a file of, newest first: the same saves, in the same order, on every worker."""
    save_dir = trainer.cfg.checkpoint.save_dir
    pattern = re.compile(rf"checkpoint_(\d+)_(\d+){re.escape(trainer.checkpoint_suffix)}\.pt$")
    mine = sorted((int(m.group(2)), int(m.group(1))) for m in map(pattern.match, os.listdir(save_dir)) if m)
    common = set.intersection(*(set(map(tuple, saves)) for saves in everyone(mine)))
    return [os.path.join(save_dir, f"checkpoint_{epoch}_{updates}{trainer.checkpoint_suffix}.pt")
            for updates, epoch in sorted(common, reverse=True)]


def choose_checkpoint_together(trainer, filename: str) -> str:
    """The checkpoint that every worker then loads: ``filename`` if every worker can read its
    own and they belong to one save (or none has one: a new run); when resuming, else the newest
    ``checkpoint_E_U`` set that is so. Each worker reads its files before any of them calls into
    fairseq's loading (which, on torch's DDP, wraps the model in a collective), and every choice
    is made from the records of all workers, gathered: all take the same steps."""
    workers = trainer.data_parallel_world_size

    def everyone(record):
        return checkpoints.gather(record, trainer.data_parallel_process_group) if workers > 1 else [record]

    problem = problem_with(everyone(read_own_file(filename, workers)))
    if problem is None:
        return filename
    READ_AHEAD.clear()
    if not resuming(trainer, filename):
        raise checkpoints.CheckpointError(problem)
    for candidate in sets_on_every_worker(trainer, everyone):
        if problem_with(everyone(read_own_file(candidate, workers))) is None:
            updates = checkpoints.LOADED[os.path.abspath(candidate)]["num_updates"]
            logger.warning(f"fairseq_base: resuming from {candidate} (update {updates}), the newest checkpoint set "
                           f"that is complete on every worker, because the last one cannot be used: {problem}")
            return candidate
        READ_AHEAD.clear()
    files = f"checkpoint_E_U{trainer.checkpoint_suffix}.pt" if workers == 1 else "checkpoint_E_U-rank-*.pt"
    raise checkpoints.CheckpointError(
        f"{problem}; and no set of {files} in {trainer.cfg.checkpoint.save_dir} is complete and readable on every "
        f"worker: pass --restore-file with a checkpoint of this run, or another --save-dir to start a new run")


def agree_on_loaded_checkpoint(trainer, filename: str, failure: Optional[str] = None) -> str:
    """The run id after every worker loaded its file ``filename``: the files', or a new one
    (rank 0's). The workers compare their shared parameters too; a ``failure`` of fairseq's
    loading on any worker stops every worker with its line."""
    loaded = checkpoints.LOADED.get(os.path.abspath(filename)) if os.path.isfile(filename) else None
    record = {"file": filename if loaded else None, "run_id": loaded["run_id"] if loaded else None,
              "num_updates": loaded["num_updates"] if loaded else 0, "new_run_id": checkpoints.new_run_id(),
              "failure": failure, "checksum": None if failure else checkpoints.shared_checksum(trainer.get_model())}
    records = [record]
    if trainer.data_parallel_world_size > 1:
        records = checkpoints.gather(record, trainer.data_parallel_process_group)
    problem = next((other["failure"] for other in records if other["failure"]), None) or \
        checkpoints.disagreement(records)
    if problem:
        raise checkpoints.CheckpointError(problem)
    return records[0]["run_id"] or records[0]["new_run_id"]


def trainer_load_checkpoint(self, filename, *args, **kwargs):
    if not has_experts(self.get_model()):
        return FAIRSEQ_TRAINER_LOAD_CHECKPOINT(self, filename, *args, **kwargs)
    chosen, failure, extra_state = choose_checkpoint_together(self, filename), None, None
    try:
        extra_state = FAIRSEQ_TRAINER_LOAD_CHECKPOINT(self, chosen, *args, **kwargs)
    except Exception as err:
        # fairseq says "Cannot load model parameters" for any error of the model's load_state_dict;
        # the plugin's own (a dense model that does not fit the options, say) names the fix.
        if isinstance(err.__context__, BaseLayerConfigError):
            err = err.__context__
        if self.data_parallel_world_size == 1:
            raise err from None
        # The others may be past it: they wait for this worker in the gather that follows, not a timeout.
        failure = f"loading {chosen} failed on worker {self.data_parallel_rank}: {checkpoints.first_line(err)}"
    finally:
        READ_AHEAD.clear()
    self.fairseq_base_run_id = agree_on_loaded_checkpoint(self, chosen, failure)
    return extra_state


def install() -> None:
    torch.serialization.add_safe_globals([argparse.Namespace])
    Trainer.__init__ = trainer_init
    Trainer.should_save_checkpoint_on_current_rank = property(should_save_checkpoint_on_current_rank)
    Trainer.state_dict = trainer_state_dict
    Trainer.load_checkpoint = trainer_load_checkpoint
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    checkpoint_utils.load_model_ensemble_and_task = load_model_ensemble_and_task

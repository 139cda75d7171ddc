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
- ``Trainer.state_dict``: every checkpoint the trainer saves carries the run id and its update.
- ``checkpoint_utils.load_checkpoint_to_cpu``: a checkpoint of a model with experts is refused
  if a tensor holds inf or NaN, and one written before the experts were stacked is read as
  if written now, optimizer state included (``old_checkpoints.upgrade``); every loaded
  file's run id and update are remembered.
- ``checkpoint_utils.load_model_ensemble_and_task`` (every ``--path``: eval-lm, generate,
  interactive, ``from_pretrained``): a path that does not exist, in one process, beside the
  ``-rank-*`` files of a run on several workers is one line naming them and the two ways to use
  them, instead of fairseq's "Model file not found" traceback.
- ``checkpoint_utils.load_checkpoint_to_cpu`` also turns a file that cannot be read (empty,
  truncated, corrupt) into one line naming it, for every model, instead of torch's traceback.
- ``Trainer.load_checkpoint``: when W workers with experts load their own files (resume,
  ``--restore-file``), they compare run id, update and a checksum of the shared parameters
  before the first step and all stop with one line if they differ. When resuming from
  ``checkpoint_last`` fails so (a kill during or between the workers' saves), they resume from
  the newest ``checkpoint_E_U`` set that is complete, readable and consistent on every worker,
  saying so in one line; with none, one line says what was found and what to pass.
- ``torch.load``'s allowed globals: fairseq stores an ``argparse.Namespace`` in the
  configuration of checkpoints of its legacy components (``--optimizer sgd``, for example),
  which torch >= 2.6 refuses under its default ``weights_only=True``. That one class is
  allowed (a Namespace runs no code when unpickled); ``weights_only`` stays on.
Touches: the per-rank files, the finite check and the run comparison act on
models with experts only. The run stamp goes into every model's checkpoint (``extra_state``,
read by nothing of fairseq's); the Namespace is allowed for every model, whose checkpoints
fairseq could not load otherwise.
"""

import argparse
import logging
import os
import pickle
import re
import zipfile
from typing import List, Optional, Tuple

import torch
from fairseq import checkpoint_utils
from fairseq.trainer import Trainer

from fairseq_base import checkpoints, old_checkpoints
from fairseq_base.fairseq_patches.which_models import as_config, has_expert_options, has_experts, is_expert_model
from fairseq_base.groups import resolve_expert_parallel_size, resolve_num_experts

logger = logging.getLogger(__name__)
FAIRSEQ_TRAINER_INIT = Trainer.__init__
FAIRSEQ_SHOULD_SAVE = Trainer.should_save_checkpoint_on_current_rank
FAIRSEQ_LOAD_CHECKPOINT_TO_CPU = checkpoint_utils.load_checkpoint_to_cpu
FAIRSEQ_LOAD_MODEL_ENSEMBLE_AND_TASK = checkpoint_utils.load_model_ensemble_and_task
FAIRSEQ_TRAINER_LOAD_CHECKPOINT = Trainer.load_checkpoint
FAIRSEQ_TRAINER_STATE_DICT = Trainer.state_dict


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
    FAIRSEQ_TRAINER_INIT(self, cfg, *args, **kwargs)


def should_save_checkpoint_on_current_rank(self) -> bool:
    if is_expert_model(self.cfg.model) and self.data_parallel_world_size > 1:
        return self.data_parallel_rank < self.cfg.model.base_expert_parallel_size
    return FAIRSEQ_SHOULD_SAVE.fget(self)


def trainer_state_dict(self):
    state = FAIRSEQ_TRAINER_STATE_DICT(self)
    checkpoints.stamp(state, getattr(self, "fairseq_base_run_id", None), self.get_num_updates())
    return state


def load_checkpoint_to_cpu(path, *args, **kwargs):
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
    return FAIRSEQ_LOAD_MODEL_ENSEMBLE_AND_TASK(filenames, *args, **kwargs)


def agree_on_loaded_checkpoint(trainer, filename: str, unreadable: Optional[str] = None) -> str:
    """The run id after ``trainer.load_checkpoint(filename)``: the file's, or a new one (rank
    0's). With W > 1 workers that each load their own file, the files must agree; a file
    ``unreadable`` on any worker stops every worker."""
    loaded = checkpoints.LOADED.get(os.path.abspath(filename)) if os.path.isfile(filename) else None
    record = {"file": filename if loaded else None, "run_id": loaded["run_id"] if loaded else None,
              "num_updates": loaded["num_updates"] if loaded else 0, "new_run_id": checkpoints.new_run_id(),
              "unreadable": unreadable}
    if trainer.data_parallel_world_size == 1:
        records = [record]
    elif has_experts(trainer.get_model()):  # every worker read its own file: they must agree
        record["checksum"] = checkpoints.shared_checksum(trainer.get_model()) if not unreadable else None
        records = checkpoints.gather(record, trainer.data_parallel_process_group)
    else:  # rank 0 read the file and sent it to the others
        records = checkpoints.gather(record, trainer.data_parallel_process_group)[:1]
    for other in records:
        if other["unreadable"]:
            raise checkpoints.UnreadableCheckpoint(other["unreadable"])
    if len(records) > 1:
        checkpoints.check_agreement(records)
    return records[0]["run_id"] or records[0]["new_run_id"]


def complete_sets(trainer, save_dir: str) -> List[Tuple[int, int, str]]:
    """(update, epoch, run id) of every ``checkpoint_E_U`` set in ``save_dir`` whose files are
    readable on every worker (each its own, by its suffix) and of one run and update, newest first."""
    pattern = re.compile(rf"checkpoint_(\d+)_(\d+){re.escape(trainer.checkpoint_suffix)}\.pt$")
    mine = {}
    for name in os.listdir(save_dir) if os.path.isdir(save_dir) else []:
        match = pattern.match(name)
        if match:
            try:  # a quick look: the tensors stay on disk
                stamp = checkpoints.provenance(checkpoints.read_checkpoint(os.path.join(save_dir, name), mmap=True))
            except checkpoints.CheckpointError:
                continue
            mine[(int(match.group(1)), int(match.group(2)))] = (stamp["run_id"], stamp["num_updates"])
    every = [mine]
    if trainer.data_parallel_world_size > 1:
        every = checkpoints.gather(mine, trainer.data_parallel_process_group)
    common = [key for key in mine if all(worker.get(key) == mine[key] for worker in every)]
    return sorted(((updates, epoch, mine[(epoch, updates)][0]) for epoch, updates in common), reverse=True)


def trainer_load_checkpoint(self, filename, *args, **kwargs):
    unreadable = None
    try:
        extra_state = FAIRSEQ_TRAINER_LOAD_CHECKPOINT(self, filename, *args, **kwargs)
    except checkpoints.UnreadableCheckpoint as err:
        if not has_experts(self.get_model()):
            raise
        extra_state, unreadable = None, str(err)
    try:
        self.fairseq_base_run_id = agree_on_loaded_checkpoint(self, filename, unreadable)
        return extra_state
    except checkpoints.CheckpointError as err:
        save_dir = self.cfg.checkpoint.save_dir
        resuming = os.path.abspath(filename) == os.path.abspath(
            os.path.join(save_dir, f"checkpoint_last{self.checkpoint_suffix}.pt"))
        if not (resuming and has_experts(self.get_model())):
            raise
        sets = complete_sets(self, save_dir)
        files = f"checkpoint_E_U{self.checkpoint_suffix or ''}.pt" if self.data_parallel_world_size == 1 else \
            "checkpoint_E_U-rank-*.pt"
        if not sets:
            raise checkpoints.CheckpointError(
                f"{err}; and no set of {files} in {save_dir} is complete and readable on every worker: pass "
                f"--restore-file with a checkpoint of this run, or another --save-dir to start a new run") from None
        updates, epoch, _ = sets[0]
        newest = os.path.join(save_dir, f"checkpoint_{epoch}_{updates}{self.checkpoint_suffix}.pt")
        logger.warning(f"fairseq_base: resuming from {newest} (update {updates}), the newest checkpoint set that is "
                       f"complete on every worker, because the last one cannot be used: {err}")
        extra_state = FAIRSEQ_TRAINER_LOAD_CHECKPOINT(self, newest, *args, **kwargs)
        self.fairseq_base_run_id = agree_on_loaded_checkpoint(self, newest)
        return extra_state


def install() -> None:
    torch.serialization.add_safe_globals([argparse.Namespace])
    Trainer.__init__ = trainer_init
    Trainer.should_save_checkpoint_on_current_rank = property(should_save_checkpoint_on_current_rank)
    Trainer.state_dict = trainer_state_dict
    Trainer.load_checkpoint = trainer_load_checkpoint
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    checkpoint_utils.load_model_ensemble_and_task = load_model_ensemble_and_task

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
- ``checkpoint_utils.save_checkpoint``: before a save, replicas of each expert must agree bit
  for bit (``checkpoints.check_replicas_agree``).
- ``Trainer.state_dict``: every checkpoint the trainer saves carries the run id and its update.
- ``checkpoint_utils.load_checkpoint_to_cpu``: a checkpoint of a model with experts is refused
  if a tensor holds inf or NaN; every loaded file's run id and update are remembered.
- ``Trainer.load_checkpoint``: when W workers with experts load their own files (resume,
  ``--restore-file``), they compare run id, update and a checksum of the shared parameters
  before the first step and all stop with one line if they differ.
- ``torch.load``'s allowed globals: fairseq stores an ``argparse.Namespace`` in the
  configuration of checkpoints of its legacy components (``--optimizer sgd``, for example),
  which torch >= 2.6 refuses under its default ``weights_only=True``. That one class is
  allowed (a Namespace runs no code when unpickled); ``weights_only`` stays on.
Touches: the per-rank files, the replica check, the finite check and the run comparison act on
models with experts only. The run stamp goes into every model's checkpoint (``extra_state``,
read by nothing of fairseq's); the Namespace is allowed for every model, whose checkpoints
fairseq could not load otherwise.
"""

import argparse
import os

import torch
from fairseq import checkpoint_utils
from fairseq.trainer import Trainer

from fairseq_base import checkpoints
from fairseq_base.fairseq_patches.which_models import as_config, has_expert_options, has_experts, is_expert_model
from fairseq_base.groups import resolve_expert_parallel_size, resolve_num_experts
from fairseq_base.layer import experts_by_layout

FAIRSEQ_TRAINER_INIT = Trainer.__init__
FAIRSEQ_SHOULD_SAVE = Trainer.should_save_checkpoint_on_current_rank
FAIRSEQ_LOAD_CHECKPOINT_TO_CPU = checkpoint_utils.load_checkpoint_to_cpu
FAIRSEQ_SAVE_CHECKPOINT = checkpoint_utils.save_checkpoint
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


def save_checkpoint(cfg, trainer, *args, **kwargs):  # on every worker
    for layout, params in experts_by_layout(trainer.get_model()):
        checkpoints.check_replicas_agree(layout, params)
    return FAIRSEQ_SAVE_CHECKPOINT(cfg, trainer, *args, **kwargs)


def trainer_state_dict(self):
    state = FAIRSEQ_TRAINER_STATE_DICT(self)
    checkpoints.stamp(state, getattr(self, "fairseq_base_run_id", None), self.get_num_updates())
    return state


def load_checkpoint_to_cpu(path, *args, **kwargs):
    state = FAIRSEQ_LOAD_CHECKPOINT_TO_CPU(path, *args, **kwargs)
    saved_cfg = state.get("cfg")
    if has_expert_options(saved_cfg.get("model") if saved_cfg else None):
        checkpoints.check_finite(state, path)
    checkpoints.remember(path, state)
    return state


def agree_on_loaded_checkpoint(trainer, filename: str) -> str:
    """The run id after ``trainer.load_checkpoint(filename)``: the file's, or a new one (rank
    0's). With W > 1 workers that each load their own file, the files must agree."""
    loaded = checkpoints.LOADED.get(os.path.abspath(filename)) if os.path.isfile(filename) else None
    record = {"file": filename if loaded else None, "run_id": loaded["run_id"] if loaded else None,
              "num_updates": loaded["num_updates"] if loaded else 0, "new_run_id": checkpoints.new_run_id()}
    if trainer.data_parallel_world_size == 1:
        return record["run_id"] or record["new_run_id"]
    group, model = trainer.data_parallel_process_group, trainer.get_model()
    if has_experts(model):  # every worker read its own file: they must agree
        record["checksum"] = checkpoints.shared_checksum(model)
        first = checkpoints.agree_across_workers(record, group)[0]
    else:  # rank 0 read the file and sent it to the others
        first = checkpoints.gather(record, group)[0]
    return first["run_id"] or first["new_run_id"]


def trainer_load_checkpoint(self, filename, *args, **kwargs):
    extra_state = FAIRSEQ_TRAINER_LOAD_CHECKPOINT(self, filename, *args, **kwargs)
    self.fairseq_base_run_id = agree_on_loaded_checkpoint(self, filename)
    return extra_state


def install() -> None:
    torch.serialization.add_safe_globals([argparse.Namespace])
    Trainer.__init__ = trainer_init
    Trainer.should_save_checkpoint_on_current_rank = property(should_save_checkpoint_on_current_rank)
    Trainer.state_dict = trainer_state_dict
    Trainer.load_checkpoint = trainer_load_checkpoint
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    checkpoint_utils.save_checkpoint = save_checkpoint

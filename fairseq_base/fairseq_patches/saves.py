"""Saves that lose nothing, for models with experts: a save is all or nothing across its files and
workers, never writes a state with inf or NaN weights, and one run holds a save directory.

Replaces:
- ``checkpoint_utils.save_checkpoint``: fairseq writes ``checkpoint_N_M`` under a temporary
  name, then copies it in place to ``checkpoint_last`` and ``checkpoint_best``: a kill or a full
  disk during a copy leaves a good file truncated. Here every file of a save goes to a
  temporary name and is flushed to disk; only when every worker has written all of its files
  are they renamed (each rename atomic), and on any failure every worker removes its
  temporaries, keeps every earlier file, and stops with one line. Before that, the replicas of
  each expert must agree bit for bit (``checkpoints.check_replicas_agree``) and the weights must
  be finite on every worker.
- ``Trainer.save_checkpoint``: fairseq's dump on a floating-point error, ``crash.pt``, is
  named per expert-parallel rank on several workers (``crash-rank-{p}.pt``), so that no file
  claims experts it does not hold.
- ``checkpoint_utils.load_checkpoint``: an explicit ``--restore-file`` that does not exist
  stops with one line (fairseq silently starts a new run and later overwrites the files of
  that name); and the first worker takes the save directory's lock (``save_lock.py``).
Touches: models with experts, trained by fairseq-train on any launch path; fairseq's own
behaviour for every other model.
"""

import os
import shutil

import torch
from fairseq import checkpoint_utils
from fairseq.trainer import Trainer

from fairseq_base import checkpoints
from fairseq_base.fairseq_patches.save_lock import hold_save_dir
from fairseq_base.fairseq_patches.which_models import has_expert_options, has_experts
from fairseq_base.layer import experts_by_layout

FAIRSEQ_SAVE_CHECKPOINT = checkpoint_utils.save_checkpoint
FAIRSEQ_TRAINER_SAVE_CHECKPOINT = Trainer.save_checkpoint
FAIRSEQ_LOAD_CHECKPOINT = checkpoint_utils.load_checkpoint


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedFiles:
    """Stands in for fairseq's writes during one save: each file goes to a temporary name beside
    it and is flushed to disk; ``commit`` renames them all, ``discard`` removes them."""

    def __init__(self):
        self.pending = {}  # final name -> temporary name

    def _temporary(self, final: str) -> str:
        self.pending[final] = f"{final}.tmp-{os.getpid()}"
        return self.pending[final]

    def write(self, obj, filename, async_write=False):  # as checkpoint_utils.torch_persistent_save
        with open(self._temporary(filename), "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    def copy(self, source, destination, overwrite=False):  # as PathManager.copy, from the staged source
        temporary = self._temporary(destination)
        shutil.copyfile(self.pending.get(source, source), temporary)
        fsync_path(temporary)
        return True

    def commit(self) -> None:
        for final, temporary in self.pending.items():
            os.replace(temporary, final)
        for directory in {os.path.dirname(final) or "." for final in self.pending}:
            fsync_path(directory)  # the renames themselves reach the disk

    def discard(self) -> None:
        for temporary in self.pending.values():
            if os.path.exists(temporary):
                os.remove(temporary)


class _PathManagerCopyingInto:
    """fairseq's PathManager, whose ``copy`` writes into the staged files."""

    def __init__(self, path_manager, staged: StagedFiles):
        self._path_manager, self.copy = path_manager, staged.copy

    def __getattr__(self, name):
        return getattr(self._path_manager, name)


def _weights_are_finite(model) -> bool:
    params = [p for p in model.parameters() if p.is_floating_point()]
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True


def save_checkpoint(cfg, trainer, epoch_itr, val_loss):  # on every worker
    model = trainer.get_model()
    if not has_experts(model) or cfg.write_checkpoints_asynchronously:
        return FAIRSEQ_SAVE_CHECKPOINT(cfg, trainer, epoch_itr, val_loss)
    workers = (trainer.data_parallel_process_group, trainer.data_parallel_world_size)
    for layout, params in experts_by_layout(model):
        checkpoints.check_replicas_agree(layout, params)
    updates = trainer.get_num_updates()
    checkpoints.raise_on_every_worker(
        None if _weights_are_finite(model) else
        f"the weights hold inf or NaN at update {updates} (the run diverged): nothing was saved, and the "
        f"checkpoints in {cfg.save_dir} are as they were; resume from them with a lower --lr (or --clip-norm)",
        *workers)
    staged, failure = StagedFiles(), None
    path_manager, persistent_save = checkpoint_utils.PathManager, checkpoint_utils.torch_persistent_save
    checkpoint_utils.PathManager = _PathManagerCopyingInto(path_manager, staged)
    checkpoint_utils.torch_persistent_save = staged.write
    try:
        saved = FAIRSEQ_SAVE_CHECKPOINT(cfg, trainer, epoch_itr, val_loss)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        saved, failure = None, f"{type(err).__name__} on worker {trainer.data_parallel_rank}: " \
                               f"{str(err).strip().splitlines()[0][:200]}"
    finally:
        checkpoint_utils.PathManager, checkpoint_utils.torch_persistent_save = path_manager, persistent_save
    failure = checkpoints.first_on_every_worker(failure, *workers)
    if failure is None:
        staged.commit()
        return saved
    staged.discard()
    raise checkpoints.CheckpointError(
        f"saving the checkpoint of update {updates} to {cfg.save_dir} failed ({failure}); nothing of this save was "
        f"kept and the earlier checkpoints are as they were: free space there (or pass another --save-dir) and run "
        f"again to resume")


def trainer_save_checkpoint(self, filename, extra_state):
    if has_experts(self.get_model()) and self.data_parallel_world_size > 1 and os.path.basename(filename) == "crash.pt":
        filename = os.path.join(os.path.dirname(filename), f"crash{self.checkpoint_suffix}.pt")
    return FAIRSEQ_TRAINER_SAVE_CHECKPOINT(self, filename, extra_state)


def restore_file_error(cfg, suffix: str):
    """Why an explicit --restore-file cannot be read here (fairseq would start a new run instead), or None."""
    if cfg.restore_file == "checkpoint_last.pt":
        return None
    path = cfg.restore_file.replace(".pt", suffix + ".pt") if suffix else cfg.restore_file
    if os.path.isfile(path):
        return None
    hint = ""
    in_save_dir = os.path.join(cfg.save_dir, path)
    if not os.path.isabs(path) and os.path.isfile(in_save_dir):
        hint = f" (a relative path is read from the current directory, not --save-dir: pass {in_save_dir})"
    return (f"--restore-file {cfg.restore_file}: no such checkpoint ({path}){hint}; pass an existing checkpoint, "
            f"or leave --restore-file out to start a new run or resume from --save-dir")


def other_kind_error(save_dir: str, workers: int):
    """Why this run must not share ``save_dir`` with the checkpoints of a run on another number of
    workers (later commands could not tell the two apart), or None."""
    found = checkpoints.runs_of_the_other_kind(save_dir, workers)
    if not found:
        return None
    theirs, ours = ("several workers", "in one process") if workers == 1 else ("one process", f"on {workers} workers")
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return (f"--save-dir {save_dir} holds the checkpoints of a run on {theirs} ({shown}); this run {ours} would "
            f"write its own beside them, and resume, --path and fairseq-base-reshard could not tell the two apart: "
            f"pass another --save-dir (to go on from that run here, join or split its files with "
            f"fairseq-base-reshard --world-size {workers} into another directory and pass --restore-file)")


def load_checkpoint(cfg, trainer, **kwargs):
    if not has_expert_options(trainer.cfg.model):
        return FAIRSEQ_LOAD_CHECKPOINT(cfg, trainer, **kwargs)
    workers = (trainer.data_parallel_process_group, trainer.data_parallel_world_size)
    checkpoints.raise_on_every_worker(restore_file_error(cfg, trainer.checkpoint_suffix) or
                                      other_kind_error(cfg.save_dir, trainer.data_parallel_world_size), *workers)
    lock = hold_save_dir(cfg.save_dir, trainer)
    loaded = FAIRSEQ_LOAD_CHECKPOINT(cfg, trainer, **kwargs)
    if lock is not None:
        lock.name_run(trainer.fairseq_base_run_id)
    return loaded


def install() -> None:
    checkpoint_utils.save_checkpoint = save_checkpoint
    checkpoint_utils.load_checkpoint = load_checkpoint
    Trainer.save_checkpoint = trainer_save_checkpoint

"""One run per save directory: the first worker holds ``SAVE_DIR/fairseq_base.lock``, which names
its run, host and process, until the run ends. A second run on the directory stops with one
line naming the holder; a lock left by a process that no longer runs on this host is taken
over with a warning. (Used by ``saves.load_checkpoint``, before a run reads or writes a file.)"""

import atexit
import datetime
import json
import logging
import os
import socket

from fairseq_base import checkpoints

logger = logging.getLogger(__name__)
LOCK_NAME = "fairseq_base.lock"


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    return (f"run {holder.get('run_id') or '(starting)'} on host {holder.get('host', '?')}, process "
            f"{holder.get('pid', '?')}, since {holder.get('since', '?')}")


class SaveDirLock:
    def __init__(self, save_dir: str):
        self.path = os.path.join(save_dir, LOCK_NAME)
        self.record = {"run_id": None, "host": socket.gethostname(), "pid": os.getpid(),
                       "since": datetime.datetime.now().isoformat(timespec="seconds")}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.record, f)
        return True

    def holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def take(self) -> None:
        """Take the lock, or raise a CheckpointError naming its holder."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if not self._create():
            holder = self.holder()
            here = holder.get("host") == self.record["host"]
            if here and holder.get("pid") == self.record["pid"]:  # an earlier run of this process (fairseq's
                os.remove(self.path)  # Python entry point called again) that has ended: ours to take
                return self.take()
            stale = here and not _process_runs(int(holder.get("pid", -1)))
            if not stale:
                raise checkpoints.CheckpointError(
                    f"--save-dir {os.path.dirname(self.path)} is in use by another run ({_describe(holder)}); wait "
                    f"for it to end or pass another --save-dir (if that run is gone, remove {self.path})")
            logger.warning(f"fairseq_base: taking over {self.path}, left by a process that no longer runs "
                           f"({_describe(holder)})")
            os.remove(self.path)
            if not self._create():
                raise checkpoints.CheckpointError(
                    f"--save-dir {os.path.dirname(self.path)}: another run took {self.path} at the same time "
                    f"({_describe(self.holder())}); pass another --save-dir")
        atexit.register(self.release)

    def name_run(self, run_id: str) -> None:
        self.record["run_id"] = run_id
        temporary = f"{self.path}.tmp-{os.getpid()}"
        with open(temporary, "w") as f:
            json.dump(self.record, f)
        os.replace(temporary, self.path)

    def release(self) -> None:
        if self.holder().get("pid") == self.record["pid"] and self.holder().get("host") == self.record["host"]:
            os.remove(self.path)


def hold_save_dir(save_dir: str, trainer) -> SaveDirLock:
    """Worker 0 takes the lock; every worker stops with the same line if it cannot."""
    lock, error = None, None
    if trainer.data_parallel_rank == 0:
        lock = SaveDirLock(save_dir)
        try:
            lock.take()
        except checkpoints.CheckpointError as err:
            error = str(err)
    checkpoints.raise_on_every_worker(error, trainer.data_parallel_process_group, trainer.data_parallel_world_size)
    return lock

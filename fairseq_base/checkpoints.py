"""Checkpoint files the plugin can trust: safe reading, finite tensors, and provenance.

- ``read_checkpoint`` loads with ``weights_only=True`` (no code runs from a file) and turns
  every unreadable file into one line naming it.
- ``check_finite`` refuses a checkpoint with inf or NaN in any tensor, naming the tensor.
- Before the trainer writes a checkpoint, ``check_replicas_agree`` makes sure that the
  workers holding the same experts hold the same bits (only one of them writes the file).
- Every checkpoint the trainer writes carries ``extra_state["fairseq_base"]``: the run id
  (kept across resumes) and the update. When W workers load per-worker files,
  ``agree_across_workers`` compares the files' run ids and updates and a checksum of the
  shared parameters on every worker, and all stop with one line if they differ.
"""

import glob
import os
import pickle
import re
import uuid
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.experts import is_expert

PROVENANCE = "fairseq_base"
SHARDED = re.compile(r"-rank-\d+\.pt$")
INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Provenance of the checkpoint files this process has loaded, by path (see ``remember``).
LOADED: Dict[str, dict] = {}


class CheckpointError(BaseLayerConfigError):
    """A checkpoint file that cannot be used; the message names it and the fix."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint file that is empty, truncated, corrupt, or would run code when loaded."""


def unreadable(path: str, err: Exception) -> UnreadableCheckpoint:
    """One line naming ``path`` for the error ``torch.load`` raised on it."""
    if isinstance(err, pickle.UnpicklingError) and "unsupported global" in str(err).lower():
        # weights_only refuses any global it does not know; other unpickling errors are damage.
        return UnreadableCheckpoint(
            f"{path} holds objects other than tensors and plain values, which could run code when loaded; "
            f"it was not loaded (fairseq checkpoints never need that): use a checkpoint written by fairseq-train "
            f"or fairseq-base-reshard")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return UnreadableCheckpoint(f"{path} is empty (0 bytes): an interrupted copy or save; restore it from "
                                    f"its source")
    # Damaged bytes make torch's readers raise almost anything.
    return UnreadableCheckpoint(f"{path} is truncated or corrupt ({type(err).__name__}: {first_line(err)}); "
                                f"restore it from its source")


def read_checkpoint(path: str, mmap: bool = False) -> dict:
    """torch.load with weights_only=True; one line naming the file for anything else. With
    ``mmap`` the tensors stay on disk (a quick look that still finds a truncated file)."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        raise unreadable(path, err) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a fairseq checkpoint (no 'model' entry)")
    return state


def saved_config(path: str) -> Optional[dict]:
    """The config a checkpoint was saved with, its tensors left on disk (mmap); None for a
    missing or unreadable file, which fairseq's own loading then reports."""
    try:
        cfg = read_checkpoint(path, mmap=True).get("cfg")
    except CheckpointError:
        return None
    return cfg if isinstance(cfg, dict) else None


def rank_files(path: str) -> List[str]:
    """The ``-rank-*`` files that fairseq's suffix rule finds for ``path`` on several workers."""
    stem = path[: -len(".pt")] if path.endswith(".pt") else path
    return sorted(glob.glob(glob.escape(stem) + "-rank-*.pt"))


def refuse_two_kinds(path: str, how_to_choose: str) -> None:
    """One line where ``path`` (NAME.pt) and NAME-rank-*.pt both exist: a one-process run's file and
    the files of a run on several workers under one name, which no reader could tell apart."""
    found = rank_files(path)
    if found and os.path.isfile(path):
        raise CheckpointError(
            f"{path} and {', '.join(os.path.basename(f) for f in found)} both exist: the file of a run in one "
            f"process and the files of a run on {len(found)} workers, under one name; {how_to_choose}")


def runs_of_the_other_kind(save_dir: str, workers: int) -> List[str]:
    """The checkpoint files in ``save_dir`` that a run on ``workers`` workers would not write:
    ``checkpoint*-rank-*.pt`` for one process, plain ``checkpoint*.pt`` for several."""
    names = os.listdir(save_dir) if os.path.isdir(save_dir) else []
    return sorted(name for name in names if name.startswith("checkpoint") and name.endswith(".pt")
                  and bool(SHARDED.search(name)) == (workers == 1))


def refuse_plain_name_of_rank_files(path: str) -> None:
    """One line for a ``--path`` that does not exist in one process when its ``-rank-*`` files do."""
    found = rank_files(path)
    if found:
        names = ", ".join(os.path.basename(f) for f in found)
        raise CheckpointError(
            f"{path} does not exist, but {names} do: the files of a run on several workers. Score them with "
            f"the same --path on {len(found)} (or a multiple of {len(found)}) workers, or join them for one "
            f"process: fairseq-base-reshard {found[0]} --world-size 1 --out {path[: -len('.pt')]}-joined.pt")


def rank_suffix(paths: List[str], rank: int, workers: int) -> Optional[str]:
    """On worker ``rank`` of W > 1, for checkpoints NAME.pt saved as K files NAME-rank-{0..K-1}.pt:
    the suffix of worker r's file, "-rank-{r % K}" (its expert-parallel rank's; K must divide W);
    None where NAME.pt exists or no such files do (fairseq's own loading then reports it)."""
    if not paths or any(os.path.exists(p) for p in paths):
        return None
    counts = {len(rank_files(p)) for p in paths}
    files = counts.pop() if len(counts) == 1 else 0
    if files == 0:
        return None
    if workers % files != 0:
        raise CheckpointError(
            f"--path {paths[0]} is a checkpoint of {files} files (one per expert-parallel rank), which {workers} "
            f"workers cannot share; run on a multiple of {files} workers, or rewrite it with fairseq-base-reshard "
            f"--world-size {workers} --expert-parallel-size Q (Q a divisor of {workers})")
    return f"-rank-{rank % files}"


def first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _tensors(value, name: str):
    """(name, tensor) for every tensor inside nested dicts, lists and tuples."""
    if torch.is_tensor(value):
        yield name, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{name}[{i}]")


def check_finite(state: dict, path: str) -> None:
    """Refuse a checkpoint with inf or NaN in any tensor of its model or optimizer state."""
    for part in ("model", "last_optimizer_state"):
        for name, tensor in _tensors(state.get(part), ""):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(
                    f"{path}: tensor {part}/{name} holds inf or NaN (a damaged file, or a run that diverged); "
                    f"restore the file from its source or use an earlier checkpoint")


def num_updates(state: dict) -> int:
    history = state.get("optimizer_history") or [{}]
    return history[-1].get("num_updates", -1)


def provenance(state: dict) -> dict:
    """{"run_id": ..., "num_updates": ...} of a checkpoint (run id None if written before the plugin stamped it)."""
    stamp = (state.get("extra_state") or {}).get(PROVENANCE) or {}
    return {"run_id": stamp.get("run_id"), "num_updates": num_updates(state)}


def stamp(state: dict, run_id: Optional[str], updates: int) -> None:
    state.setdefault("extra_state", {})[PROVENANCE] = {"run_id": run_id, "num_updates": updates}


def remember(path: str, state: dict) -> None:
    LOADED[os.path.abspath(path)] = provenance(state)


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def shared_checksum(model: nn.Module) -> List[float]:
    """Two float64 sums over the shared (non-expert) parameters: the same on workers that
    hold the same shared parameters, different (in practice) otherwise."""
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for param in model.parameters():
            if not is_expert(param):
                # Cast inside the reductions: no float64 copy of the parameter.
                total += torch.stack([param.sum(dtype=torch.float64),
                                      torch.linalg.vector_norm(param, dtype=torch.float64) ** 2]).cpu()
    return total.tolist()


def bit_fingerprint(params) -> Tensor:
    """Two int64 sums over the bits of ``params`` (plain and position-weighted, modulo 2**64, so
    that summation order does not matter): equal for equal bits, and unequal, in practice,
    when a single bit differs."""
    total = None
    for param in params:
        bits = param.detach().reshape(-1).view(INT_OF_WIDTH[param.element_size()]).long()
        weights = torch.arange(1, bits.numel() + 1, device=bits.device) % 65521 + 1
        sums = torch.stack([bits.sum(), (bits * weights).sum()])
        total = sums if total is None else total + sums
    return total if total is not None else torch.zeros(2, dtype=torch.long)


def check_replicas_agree(layout, params) -> None:
    """Every worker's expert ``params`` must be bit-identical to those of the other workers of
    its expert-parallel rank. One all-gather of two numbers; every worker reaches the same
    verdict, so all stop together."""
    if layout.replicas == 1:
        return
    mine = bit_fingerprint(params)
    every = [torch.empty_like(mine) for _ in range(layout.world_size)]
    dist.all_gather(every, mine, group=layout.world_group)
    size = layout.expert_parallel_size
    for rank in range(size, layout.world_size):
        if not torch.equal(every[rank], every[rank % size]):
            raise CheckpointError(
                f"worker {rank}'s experts differ from those of worker {rank % size}, which holds the same experts "
                f"(--base-expert-parallel-size {size}): their gradients were not reduced alike; nothing was saved "
                f"(please report this with your command line)")


def gather(record: dict, group=None) -> List[dict]:
    """Every worker's ``record``, by rank."""
    records = [None] * dist.get_world_size(group)
    dist.all_gather_object(records, record, group=group)
    return records


def first_on_every_worker(value: Optional[str], group=None, world_size: int = 1) -> Optional[str]:
    """The first worker's ``value`` that is not None (in rank order), on every worker of ``group``."""
    values = gather(value, group) if world_size > 1 else [value]
    return next((v for v in values if v is not None), None)


def raise_on_every_worker(error: Optional[str], group=None, world_size: int = 1) -> None:
    """Raise a CheckpointError with the first worker's ``error`` (None: none) on every worker
    of ``group``, so that all stop together with the same line."""
    first = first_on_every_worker(error, group, world_size)
    if first:
        raise CheckpointError(first)


def agree_across_workers(record: dict, group=None) -> List[dict]:
    """Gather every worker's ``record`` ({"file", "run_id", "num_updates", "checksum"}) and
    raise the same CheckpointError on every worker if they differ. Returns the records."""
    records = gather(record, group)
    problem = disagreement(records)
    if problem:
        raise CheckpointError(problem)
    return records


def disagreement(records: List[dict]) -> Optional[str]:
    """The line naming the first two files whose records (one per worker) differ, or None."""
    first = records[0]
    for other in records[1:]:
        for key, what in (("run_id", "runs"), ("num_updates", "updates"), ("checksum", "shared parameters")):
            if other.get(key) != first.get(key):
                return (f"the workers loaded checkpoint files that do not belong together (different {what}): "
                        f"{_describe(first)} and {_describe(other)}; give every worker files of one save "
                        f"(fairseq-base-reshard checks a set and rewrites it for any number of workers)")
    return None


def _describe(record: dict) -> str:
    run = record["run_id"] or "unstamped"
    return f"{record['file'] or 'no file (fresh start)'} (run {run}, update {record['num_updates']})"

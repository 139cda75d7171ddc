"""fairseq-base-reshard: rewrite a BASE checkpoint for another layout of workers.

    fairseq-base-reshard save_dir/checkpoint_best-rank-0.pt --world-size 1 --out model.pt
    fairseq-base-reshard model.pt --world-size 4 --out model4.pt   # model4-rank-{0..3}.pt
    fairseq-base-reshard model.pt --world-size 16 --expert-parallel-size 8 --out m.pt  # m-rank-{0..7}.pt

A checkpoint of a run on W workers in expert-parallel groups of P is P files,
``NAME-rank-{p}.pt``: the shared parameters (identical in every file) and the experts of
expert-parallel rank p, whose global ids each BASE layer keeps in its ``expert_ids`` buffer
(with P = W, the default, one file per worker). A set of W files, replicas included, is read
too, and its replicas must agree bit for bit. Any one file (or a one-file checkpoint, or
NAME.pt for the files NAME-rank-*.pt, as fairseq's ``--path`` names them) is read with its siblings, checked, and written again for M workers in groups of Q (default:
Q = M), for any Q that divides M and the expert count: ``OUT.pt`` for M = 1,
``OUT-rank-{q}.pt`` for q < Q otherwise (fairseq's suffix rule, so that ``--path OUT.pt``
finds them on M workers).

Files are read with ``weights_only=True`` and must hold finite tensors. Nothing is written
unless every check passes, and writing is all or nothing: every output is written and
flushed under a temporary name first, and the outputs replace the files at their names only
when all are written (on a failure the temporaries go and the old files stay). Every failure
is one line, ``fairseq-base-reshard: error: ...``, and exit code 1.
"""

import argparse
import os
import re
import sys
import tempfile
from collections import OrderedDict
from typing import Callable, List

import torch

from fairseq_base import old_checkpoints
from fairseq_base.checkpoints import (check_finite, num_updates, provenance, rank_files, read_checkpoint,
                                     refuse_two_kinds, stamp)
from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.experts import EXPERT_IDS
from fairseq_base.optimizer_state import optimizer_state_by_name, parameter_names, per_element, regrouped, stack_entries

SHARD_NAME = re.compile(r"^(?P<stem>.*)-rank-(?P<rank>\d+)\.pt$")


class ReshardError(BaseLayerConfigError):
    pass


def shard_paths(path: str) -> List[str]:
    """The files of the checkpoint that ``path`` belongs to, in rank order."""
    match = SHARD_NAME.match(path)
    refuse_two_kinds(path, f"pass {rank_files(path)[0] if rank_files(path) else ''} for the run on several workers, "
                           f"or move those files to another directory to read {path}")
    if match is None and not os.path.isfile(path) and rank_files(path):  # NAME.pt for NAME-rank-*.pt, as fairseq
        match = SHARD_NAME.match(rank_files(path)[0])
    if match is None:
        if not os.path.isfile(path):
            raise ReshardError(f"{path}: no such checkpoint")
        return [path]
    stem = match["stem"]
    ranks = sorted(int(SHARD_NAME.match(p)["rank"]) for p in rank_files(stem + ".pt") if SHARD_NAME.match(p))
    missing = sorted(set(range(max(ranks, default=0) + 1)) - set(ranks))
    if missing or not ranks:
        names = ", ".join(f"{stem}-rank-{r}.pt" for r in missing or [int(match["rank"])])
        raise ReshardError(f"missing shard(s): {names}; a checkpoint of W workers needs ranks 0..W-1")
    return [f"{stem}-rank-{r}.pt" for r in ranks]


def _expert_key(key: str, layers: List[str]):
    """(layer prefix, rest of the key) for the stacked parameters of a layer's local experts (local
    expert j at index j of their first dimension), else None."""
    for prefix in layers:
        if key.startswith(prefix + "experts."):
            return prefix, key[len(prefix + "experts."):]
    return None


def _row(entry: dict, j: int) -> dict:
    """Local expert j's part of the optimizer entry of stacked parameters."""
    return {k: v[j] if per_element(v) else v for k, v in entry.items()}


class Checkpoint:
    """All shards of one checkpoint, merged: shared entries and every expert by global id."""

    def __init__(self, paths: List[str]):
        self.paths = paths
        self.states = [read_checkpoint(p) for p in paths]
        for path, state in zip(paths, self.states):
            check_finite(state, path)
            old_checkpoints.upgrade(state)
        first = self.states[0]
        saved_for = first["cfg"]["distributed_training"]["distributed_world_size"]
        parallel = first["cfg"]["model"].get("base_expert_parallel_size") or saved_for
        if len(paths) not in (parallel, saved_for):
            match = SHARD_NAME.match(paths[0])
            stem = match["stem"] if match else paths[0][: -len(".pt")]
            missing = [f"{stem}-rank-{r}.pt" for r in range(len(paths), parallel)]
            raise ReshardError(f"{paths[0]} was saved by {saved_for} workers in expert-parallel groups of {parallel} "
                               f"but {len(paths)} shard(s) are there; missing shard(s): "
                               f"{', '.join(missing) or 'none (extra shards?)'}")
        self.layers = [k[: -len(EXPERT_IDS)] for k in first["model"] if k.endswith(EXPERT_IDS)]
        if not self.layers:
            arch = ((first.get("cfg") or {}).get("model") or {}).get("_name")
            kind = ("a transformer_lm_base model without experts (--base-layers 0)" if arch == "transformer_lm_base"
                    else "not a transformer_lm_base model")
            raise ReshardError(f"{paths[0]}: no expert layer in this checkpoint ({kind}): it has nothing to "
                               f"reshard, and fairseq loads it as it is on any number of workers")
        self.num_updates = num_updates(first)
        self.run_id = provenance(first)["run_id"]
        # Every file holds E / P experts (hash layers have no centroids to count them by).
        self.num_experts = {p: first["model"][p + EXPERT_IDS].numel() * parallel for p in self.layers}
        self._check_consistent()
        self._check_replicas(parallel)
        self.paths, self.states = self.paths[:parallel], self.states[:parallel]
        self.experts = {p: {} for p in self.layers}  # prefix -> global id -> {rest: tensor}
        self.expert_optim = {}  # (prefix, global id, rest) -> optimizer state
        optim = [optimizer_state_by_name(s) for s in self.states]
        self.shared_optim = optim[0]
        for path, state, by_name in zip(self.paths, self.states, optim):
            model = state["model"]
            ids = {p: model[p + EXPERT_IDS].tolist() for p in self.layers}
            for prefix in self.layers:
                if set(ids[prefix]) & set(self.experts[prefix]):
                    raise ReshardError(f"{path} repeats experts of another shard: a shard of another run")
            for key, value in model.items():
                found = _expert_key(key, self.layers)
                if found:
                    prefix, rest = found
                    for j, global_id in enumerate(ids[prefix]):
                        self.experts[prefix].setdefault(global_id, {})[rest] = value[j]
                        if by_name is not None:
                            self.expert_optim[(prefix, global_id, rest)] = _row(by_name[key], j)
        for prefix, experts in self.experts.items():
            if sorted(experts) != list(range(self.num_experts[prefix])):
                raise ReshardError(
                    f"{prefix}experts: the shards hold experts {sorted(experts)} but the layer has "
                    f"{self.num_experts[prefix]}; a shard is missing or comes from another run")
        if any(o is None for o in optim):
            self.shared_optim = None

    def _check_consistent(self) -> None:
        first = self.states[0]
        for path, state in zip(self.paths[1:], self.states[1:]):
            if num_updates(state) != self.num_updates:
                raise ReshardError(
                    f"{path} is at update {num_updates(state)} but {self.paths[0]} at {self.num_updates}: "
                    f"shards from different updates")
            if provenance(state)["run_id"] != self.run_id:
                raise ReshardError(f"{path} comes from run {provenance(state)['run_id']} but {self.paths[0]} from "
                                   f"run {self.run_id}: shards of different runs")
            if state["cfg"]["model"] != first["cfg"]["model"]:
                raise ReshardError(f"{path} has another model configuration than {self.paths[0]}: a shard of another run")
            for key, value in first["model"].items():
                if _expert_key(key, self.layers) is None and not key.endswith(EXPERT_IDS):
                    other = state["model"].get(key)
                    if other is None or not torch.equal(other, value):
                        raise ReshardError(
                            f"shared parameter {key} differs between {self.paths[0]} and {path}: "
                            f"a shard of another run (or not trained with --ddp-backend legacy_ddp)")

    def _check_replicas(self, parallel: int) -> None:
        """File r of a set of W files holds the experts of file r % P: they must be the same bits."""
        for rank in range(parallel, len(self.paths)):
            mine, theirs = self.states[rank]["model"], self.states[rank % parallel]["model"]
            for key, value in theirs.items():
                if _expert_key(key, self.layers) or key.endswith(EXPERT_IDS):
                    if key not in mine or not torch.equal(mine[key], value):
                        raise ReshardError(
                            f"{self.paths[rank]} and {self.paths[rank % parallel]} hold the same experts (expert-parallel "
                            f"size {parallel}) but {key} differs: replicas that drifted apart; use a checkpoint "
                            f"saved by fairseq-train with this plugin")

    def write(self, world_size: int, parallel: int, out: str) -> List[str]:
        if world_size % parallel != 0:
            raise ReshardError(f"--expert-parallel-size {parallel} does not divide --world-size {world_size}; "
                               f"use a divisor of {world_size}")
        for prefix, count in self.num_experts.items():
            if count % parallel != 0:
                option = "--expert-parallel-size" if parallel != world_size else "--world-size"
                raise ReshardError(
                    f"{option} {parallel} does not divide the {count} experts of {prefix.rstrip('.')}; use a divisor "
                    f"of {count}" + ("" if parallel != world_size else " (or --expert-parallel-size with one)"))
        outputs = output_paths(out, world_size, parallel, self.paths)
        states = [self._shard(self.states[0], world_size, parallel, rank) for rank in range(len(outputs))]
        write_all_or_nothing(states, outputs)
        return outputs

    def _shard(self, template, world_size: int, parallel: int, rank: int):
        model, names_in_order = OrderedDict(), []
        emitted = set()
        for key, value in template["model"].items():
            found = _expert_key(key, self.layers)
            prefix = found[0] if found else next((p for p in self.layers if key == p + EXPERT_IDS), None)
            if prefix is None:
                model[key] = value
                names_in_order.append((key, None))
                continue
            if prefix in emitted:
                continue
            emitted.add(prefix)
            local = self.num_experts[prefix] // parallel
            ids = list(range(rank * local, (rank + 1) * local))
            model[prefix + EXPERT_IDS] = torch.tensor(ids)
            for rest in self.experts[prefix][ids[0]]:
                model[f"{prefix}experts.{rest}"] = torch.stack([self.experts[prefix][g][rest] for g in ids])
                names_in_order.append((f"{prefix}experts.{rest}", [(prefix, g, rest) for g in ids]))
        state = dict(template, model=model)
        state["cfg"] = dict(template["cfg"], model=dict(template["cfg"]["model"]),
                            distributed_training=dict(template["cfg"]["distributed_training"]))
        state["cfg"]["distributed_training"]["distributed_world_size"] = world_size
        # E and P must not depend on the world size once they are written down.
        state["cfg"]["model"]["base_experts"] = self.num_experts[self.layers[0]]
        state["cfg"]["model"]["base_expert_parallel_size"] = parallel
        state["last_optimizer_state"] = self._optimizer_shard(template, names_in_order, model)
        state["extra_state"] = dict(template.get("extra_state") or {})
        stamp(state, self.run_id, self.num_updates)
        return state

    def _optimizer_shard(self, template, names_in_order, model):
        if self.shared_optim is None:
            return None
        params = parameter_names(model)
        by_key = dict(names_in_order)
        entries = [stack_entries([self.expert_optim[e] for e in by_key[n]]) if by_key[n] else self.shared_optim[n]
                   for n in params]
        return regrouped(template["last_optimizer_state"], entries)


def output_paths(out: str, world_size: int, parallel: int, inputs: List[str]) -> List[str]:
    """The files to write for ``--out`` (its directory created if need be), refused where they
    would overwrite an input, name a directory, sit in a directory that cannot be written, or
    leave a stale larger set behind."""
    if os.path.isdir(out):
        raise ReshardError(f"--out {out} is a directory; name a file, e.g. {os.path.join(out, 'model.pt')}")
    if not out.endswith(".pt"):
        raise ReshardError(f"--out {out!r} must end in .pt (fairseq adds -rank-N before it)")
    stem = out[: -len(".pt")]
    outputs = [out] if world_size == 1 else [f"{stem}-rank-{r}.pt" for r in range(parallel)]
    for path in outputs:
        clash = next((i for i in inputs if os.path.exists(path) and os.path.samefile(path, i)), None)
        if clash:
            raise ReshardError(f"--out {out} would overwrite the input {clash}; choose another --out")
        if os.path.isdir(path):
            raise ReshardError(f"{path} is a directory; choose another --out")
    directory = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise ReshardError(f"--out {out}: cannot create directory {directory} ({err.strerror}); "
                           f"choose another --out") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ReshardError(f"--out {out}: directory {directory} is not writable; choose another --out")
    stale = [p for p in rank_files(out)
             if world_size > 1 and SHARD_NAME.match(p) and int(SHARD_NAME.match(p)["rank"]) >= parallel]
    if stale:
        raise ReshardError(f"{stale[0]} (and {len(stale) - 1} more) would be left beside the new files as shards of "
                           f"another set; remove them or choose another --out")
    return outputs


def _file_mode() -> int:
    """The mode fairseq's own checkpoints get: 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_all_or_nothing(states, paths: List[str]) -> None:
    """Write every state under a temporary name (flushed to disk), then move them all into place.

    On any failure the temporaries are removed and the files that were at ``paths`` are
    put back as they were (they are kept under a second name until all are in place)."""
    temporaries, backups, replaced, current = [], {}, [], paths[0]
    try:
        for state, current in zip(states, paths):
            fd, tmp = tempfile.mkstemp(prefix=os.path.basename(current) + ".", suffix=".tmp",
                                       dir=os.path.dirname(os.path.abspath(current)))
            temporaries.append(tmp)
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _file_mode())
        for current in paths:
            if os.path.exists(current):
                backups[current] = current + ".reshard-backup"
                os.link(current, backups[current])
        for tmp, current in zip(temporaries, paths):
            os.replace(tmp, current)
            replaced.append(current)
    except BaseException as err:  # a full disk, or an interrupt: leave things as they were
        for path in replaced:  # put the old files back
            if path in backups:
                os.replace(backups[path], path)
            else:
                os.unlink(path)
        for tmp in temporaries:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if isinstance(err, (OSError, RuntimeError)):  # torch.save reports a full disk as a RuntimeError
            reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[0][:200]
            raise ReshardError(f"cannot write {current}: {reason}; nothing was changed "
                               f"(free disk space or choose another --out)") from None
        raise
    finally:
        for backup in backups.values():
            if os.path.exists(backup):
                os.unlink(backup)


def reshard(checkpoint: str, world_size: int, out: str, expert_parallel_size: int = 0,
            report: Callable[[str], None] = print) -> List[str]:
    """Write ``checkpoint`` for ``world_size`` workers in groups of ``expert_parallel_size`` as
    ``out`` (the paths written); ``report`` takes the lines that say what was read and written."""
    if world_size < 1:
        raise ReshardError(f"--world-size must be >= 1, got {world_size}")
    if expert_parallel_size < 0:
        raise ReshardError(f"--expert-parallel-size must be >= 1 (0: --world-size), got {expert_parallel_size}")
    ckpt = Checkpoint(shard_paths(checkpoint))
    outputs = ckpt.write(world_size, expert_parallel_size or world_size, out)
    counts = ", ".join(f"{p.rstrip('.')}: {n} experts" for p, n in ckpt.num_experts.items())
    report(f"| read {len(ckpt.paths)} shard(s) at update {ckpt.num_updates} ({counts})")
    if ckpt.shared_optim is None:
        report("| notice: optimizer state not moved (it cannot be mapped to parameters here); "
               "resume training with --reset-optimizer")
    for path in outputs:
        report(f"| wrote {path}")
    return outputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairseq-base-reshard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="one shard (NAME-rank-R.pt), the set's NAME.pt, or a one-file checkpoint")
    parser.add_argument("--world-size", type=int, required=True, help="number of workers to write for (M)")
    parser.add_argument("--expert-parallel-size", type=int, default=0,
                        help="workers in each expert-parallel group (Q); one file is written per group rank "
                             "(default: --world-size)")
    parser.add_argument("--out", required=True, help="output name, e.g. model.pt (M > 1: model-rank-R.pt)")
    return parser


def cli_main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        reshard(args.checkpoint, args.world_size, args.out, args.expert_parallel_size)
    except BaseLayerConfigError as err:  # ReshardError and the checkpoint errors of checkpoints.py
        sys.exit(f"fairseq-base-reshard: error: {err}")


if __name__ == "__main__":
    cli_main()

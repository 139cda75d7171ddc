"""fairseq-base-reshard: rewrite a BASE checkpoint for another number of workers.

    fairseq-base-reshard save_dir/checkpoint_best-rank-0.pt --world-size 1 --out model.pt
    fairseq-base-reshard model.pt --world-size 4 --out model4.pt   # model4-rank-{0..3}.pt

A checkpoint of a W-worker run is W files, ``NAME-rank-{r}.pt``: the shared parameters
(identical in every file) and the experts of worker r, whose global ids each BASE layer
keeps in its ``expert_ids`` buffer. Any one of them (or a one-file checkpoint) is read
with its siblings, checked, and written again for M workers, for any M that divides the
expert count: ``OUT.pt`` for M = 1, ``OUT-rank-{r}.pt`` for M > 1 (fairseq's suffix rule,
so ``--path OUT.pt`` finds them on M workers). Nothing is written unless every check
passes, and each file is written to a temporary name and renamed into place.
"""

import argparse
import glob
import os
import re
import sys
import tempfile
from collections import OrderedDict
from typing import List

import torch

from fairseq_base.errors import BaseLayerConfigError

SHARD_NAME = re.compile(r"^(?P<stem>.*)-rank-(?P<rank>\d+)\.pt$")
EXPERT_IDS = "expert_ids"
# Buffers of transformer_lm_base; every other state-dict entry is a parameter.
BUFFER_SUFFIXES = (EXPERT_IDS, "decoder.version", "_float_tensor")


class ReshardError(BaseLayerConfigError):
    pass


def shard_paths(path: str) -> List[str]:
    """The files of the checkpoint that ``path`` belongs to, in rank order."""
    match = SHARD_NAME.match(path)
    if match is None:
        if not os.path.isfile(path):
            raise ReshardError(f"{path}: no such checkpoint")
        return [path]
    stem = match["stem"]
    ranks = sorted(int(SHARD_NAME.match(p)["rank"]) for p in glob.glob(glob.escape(stem) + "-rank-*.pt"))
    missing = sorted(set(range(max(ranks, default=0) + 1)) - set(ranks))
    if missing or not ranks:
        names = ", ".join(f"{stem}-rank-{r}.pt" for r in missing or [int(match["rank"])])
        raise ReshardError(f"missing shard(s): {names}; a checkpoint of W workers needs ranks 0..W-1")
    return [f"{stem}-rank-{r}.pt" for r in ranks]


def _num_updates(state) -> int:
    history = state.get("optimizer_history") or [{}]
    return history[-1].get("num_updates", -1)


def _expert_key(key: str, layers: List[str]):
    """(layer prefix, local expert index, rest of the key) for an expert parameter, else None."""
    for prefix in layers:
        if key.startswith(prefix + "experts."):
            local, rest = key[len(prefix + "experts."):].split(".", 1)
            return prefix, int(local), rest
    return None


class Checkpoint:
    """All shards of one checkpoint, merged: shared entries and every expert by global id."""

    def __init__(self, paths: List[str]):
        self.paths = paths
        self.states = [torch.load(p, map_location="cpu", weights_only=False) for p in paths]
        first = self.states[0]
        saved_for = first["cfg"]["distributed_training"]["distributed_world_size"]
        if saved_for != len(paths):
            match = SHARD_NAME.match(paths[0])
            stem = match["stem"] if match else paths[0][: -len(".pt")]
            missing = [f"{stem}-rank-{r}.pt" for r in range(len(paths), saved_for)]
            raise ReshardError(f"{paths[0]} was saved by {saved_for} workers but {len(paths)} shard(s) are there; "
                               f"missing shard(s): {', '.join(missing) or 'none (extra shards?)'}")
        self.layers = [k[: -len(EXPERT_IDS)] for k in first["model"] if k.endswith(EXPERT_IDS)]
        if not self.layers:
            raise ReshardError(f"{paths[0]}: no BASE layer in this checkpoint (not a transformer_lm_base model)")
        self.num_updates = _num_updates(first)
        # Every worker holds E / W experts (hash layers have no centroids to count them by).
        self.num_experts = {p: first["model"][p + EXPERT_IDS].numel() * len(paths) for p in self.layers}
        self._check_consistent()
        self.experts = {p: {} for p in self.layers}  # prefix -> global id -> {rest: tensor}
        self.expert_optim = {}  # (prefix, global id, rest) -> optimizer state
        optim = [self._optimizer_state_by_name(s) for s in self.states]
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
                    prefix, local, rest = found
                    global_id = ids[prefix][local]
                    self.experts[prefix].setdefault(global_id, {})[rest] = value
                    if by_name is not None:
                        self.expert_optim[(prefix, global_id, rest)] = by_name[key]
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
            if _num_updates(state) != self.num_updates:
                raise ReshardError(
                    f"{path} is at update {_num_updates(state)} but {self.paths[0]} at {self.num_updates}: "
                    f"shards from different updates")
            if state["cfg"]["model"] != first["cfg"]["model"]:
                raise ReshardError(f"{path} has another model configuration than {self.paths[0]}: a shard of another run")
            for key, value in first["model"].items():
                if _expert_key(key, self.layers) is None and not key.endswith(EXPERT_IDS):
                    other = state["model"].get(key)
                    if other is None or not torch.equal(other, value):
                        raise ReshardError(
                            f"shared parameter {key} differs between {self.paths[0]} and {path}: "
                            f"a shard of another run (or not trained with --ddp-backend legacy_ddp)")

    @staticmethod
    def _optimizer_state_by_name(state):
        """Optimizer state per parameter name, or None where it cannot be mapped safely."""
        optim = state.get("last_optimizer_state")
        if not optim or len(optim.get("param_groups", [])) != 1:
            return None
        names = [k for k in state["model"] if not k.endswith(BUFFER_SUFFIXES)]
        indices = optim["param_groups"][0]["params"]
        if len(indices) != len(names):
            return None  # e.g. fp16 training keeps one flat fp32 copy of all parameters
        by_name = {}
        for name, index in zip(names, indices):
            entry = optim["state"].get(index, {})
            shape = state["model"][name].shape
            if any(torch.is_tensor(v) and v.dim() > 0 and v.shape != shape for v in entry.values()):
                return None
            by_name[name] = entry
        return by_name

    def write(self, world_size: int, out: str) -> List[str]:
        for prefix, count in self.num_experts.items():
            if count % world_size != 0:
                raise ReshardError(
                    f"--world-size {world_size} does not divide the {count} experts of {prefix.rstrip('.')}; "
                    f"use a divisor of {count}")
        template = self.states[0]
        outputs = [out] if world_size == 1 else [out[: -len(".pt")] + f"-rank-{r}.pt" for r in range(world_size)]
        states = [self._shard(template, world_size, rank) for rank in range(world_size)]
        for path, state in zip(outputs, states):
            _atomic_save(state, path)
        return outputs

    def _shard(self, template, world_size: int, rank: int):
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
            local = self.num_experts[prefix] // world_size
            ids = list(range(rank * local, (rank + 1) * local))
            model[prefix + EXPERT_IDS] = torch.tensor(ids)
            for j, global_id in enumerate(ids):
                for rest, tensor in self.experts[prefix][global_id].items():
                    model[f"{prefix}experts.{j}.{rest}"] = tensor
                    names_in_order.append((f"{prefix}experts.{j}.{rest}", (prefix, global_id, rest)))
        state = dict(template, model=model)
        state["cfg"] = dict(template["cfg"], model=dict(template["cfg"]["model"]),
                            distributed_training=dict(template["cfg"]["distributed_training"]))
        state["cfg"]["distributed_training"]["distributed_world_size"] = world_size
        # E must not depend on the world size once it is written down.
        state["cfg"]["model"]["base_experts"] = self.num_experts[self.layers[0]]
        state["last_optimizer_state"] = self._optimizer_shard(template, names_in_order)
        return state

    def _optimizer_shard(self, template, names_in_order):
        if self.shared_optim is None:
            return None
        params = [n for n, _ in names_in_order if not n.endswith(BUFFER_SUFFIXES)]
        by_key = dict(names_in_order)
        entries = [self.expert_optim[by_key[n]] if by_key[n] else self.shared_optim[n] for n in params]
        group = dict(template["last_optimizer_state"]["param_groups"][0], params=list(range(len(params))))
        return {"state": {i: e for i, e in enumerate(entries) if e}, "param_groups": [group]}


def _atomic_save(state, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def reshard(checkpoint: str, world_size: int, out: str) -> List[str]:
    if world_size < 1:
        raise ReshardError(f"--world-size must be >= 1, got {world_size}")
    if not out.endswith(".pt"):
        raise ReshardError(f"--out {out!r} must end in .pt (fairseq adds -rank-N before it)")
    ckpt = Checkpoint(shard_paths(checkpoint))
    outputs = ckpt.write(world_size, out)
    counts = ", ".join(f"{p.rstrip('.')}: {n} experts" for p, n in ckpt.num_experts.items())
    print(f"| read {len(ckpt.paths)} shard(s) at update {ckpt.num_updates} ({counts})")
    if ckpt.shared_optim is None:
        print("| notice: optimizer state not moved (it cannot be mapped to parameters here); "
              "resume training with --reset-optimizer")
    for path in outputs:
        print(f"| wrote {path}")
    return outputs


def cli_main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fairseq-base-reshard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="one shard (NAME-rank-R.pt) or a one-file checkpoint")
    parser.add_argument("--world-size", type=int, required=True, help="number of workers to write for (M)")
    parser.add_argument("--out", required=True, help="output name, e.g. model.pt (M > 1: model-rank-R.pt)")
    args = parser.parse_args(argv)
    try:
        reshard(args.checkpoint, args.world_size, args.out)
    except ReshardError as err:
        sys.exit(f"fairseq-base-reshard: error: {err}")


if __name__ == "__main__":
    cli_main()

"""fairseq-base-upcycle: start a transformer_lm_base model from a dense fairseq transformer_lm
checkpoint (sparse upcycling, Komatsuzaki et al., ICLR 2023).

    fairseq-base-upcycle DENSE.pt --out BASE.pt --base-layers 1 --base-experts 8 [--world-size W]
    fairseq-train DATA --user-dir fairseq_base --arch transformer_lm_base ... --finetune-from-model DENSE.pt

The conversion itself, and what the upcycled model computes, is ``dense_to_experts.py``'s.
The file also keeps the dense run's place: its updates, learning-rate schedule, data position
and optimizer state, moved parameter by parameter (new parameters start with none). Train from
it with ``--continue-once OUT.pt`` to go on with the dense run, upcycled (the same data order
and schedule), or with ``--finetune-from-model OUT.pt`` to start a new run from it.

fairseq's ``--finetune-from-model DENSE.pt`` with ``--arch transformer_lm_base`` upcycles the
model in one step when it loads (``TransformerLanguageModelBase.load_state_dict``), as a new run.
"""

import argparse
import os
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from fairseq_base.checkpoints import check_finite, new_run_id, num_updates, read_checkpoint, stamp
from fairseq_base.dense_to_experts import UpcycleError, state_has_experts, upcycle_mapping, upcycle_optimizer_entries
from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.experts import has_experts
from fairseq_base.models.transformer_lm_base import TransformerLanguageModelBaseConfig
from fairseq_base.optimizer_state import optimizer_state_by_name, parameter_names, regrouped
from fairseq_base.options import model_fields
from fairseq_base.reshard import reshard, write_all_or_nothing


def dense_config(state: dict, path: str) -> dict:
    """The dense checkpoint's config as a dict, refused unless it is a dense transformer_lm."""
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    cfg = state.get("cfg")
    if cfg is None and state.get("args") is not None:  # written by fairseq before Hydra
        cfg = convert_namespace_to_omegaconf(state["args"])
    if cfg is None:
        raise UpcycleError(f"{path} has no model configuration ('cfg'): not a fairseq checkpoint")
    cfg = OmegaConf.to_container(cfg) if OmegaConf.is_config(cfg) else dict(cfg)
    name = (cfg.get("model") or {}).get("_name")
    if state_has_experts(state["model"]):
        raise UpcycleError(f"{path} already has expert layers: upcycle the dense model it started from, or "
                           f"change its layout with fairseq-base-reshard")
    if name not in ("transformer_lm", "transformer_lm_base"):
        raise UpcycleError(f"{path} is a {name} model; fairseq-base-upcycle starts from a dense transformer_lm")
    return cfg


def build_upcycled(cfg: dict, data: Optional[str], options: dict):
    """(model config, model) of transformer_lm_base: the dense model's config with ``options``, built
    in this process (all experts here) for the dictionary in ``data`` (else the dense run's)."""
    from fairseq import tasks
    from fairseq.dataclass.utils import merge_with_parent
    from omegaconf import OmegaConf

    task_cfg = dict(cfg["task"], data=data or cfg["task"].get("data"))
    dictionary = os.path.join(str(task_cfg["data"]).split(os.pathsep)[0], "dict.txt")
    if not os.path.isfile(dictionary):
        raise UpcycleError(f"{dictionary} does not exist: pass --data DIR, the data directory (with its dict.txt) "
                           f"the dense model was trained on")
    # The dense run's trunk; the expert options are the command's, else the options table's defaults
    # (a dense transformer_lm_base saved with --base-layers 0 does not keep them at 0).
    trunk = {key: value for key, value in cfg["model"].items() if not key.startswith("base_")}
    model_cfg = dict(trunk, **options, _name="transformer_lm_base")
    model_cfg = merge_with_parent(TransformerLanguageModelBaseConfig(), OmegaConf.create(model_cfg))
    task = tasks.setup_task(OmegaConf.create(task_cfg))
    return model_cfg, task.build_model(model_cfg)


def check_dictionary(dense: Dict[str, Tensor], model: nn.Module, data: str) -> None:
    embeddings = dense.get("decoder.embed_tokens.weight")  # absent with adaptive or character inputs
    rows, size = (embeddings.size(0) if embeddings is not None else None), len(model.decoder.dictionary)
    if rows is not None and rows != size:
        raise UpcycleError(f"the dense model's dictionary has {rows} entries but {data}/dict.txt gives {size}: "
                           f"pass --data with the data directory the dense model was trained on")


def upcycle(path: str, out: str, options: dict, data: Optional[str] = None, world_size: int = 1,
            seed: Optional[int] = None, criterion: Optional[str] = None) -> Tuple[List[str], int]:
    """Write the upcycled checkpoint of the dense ``path`` to ``out`` (``out``-rank-R.pt for
    ``world_size`` > 1, as training on that many workers writes it); the paths written, and the
    dense run's updates that the files go on from (0: a start for a new run only). The new
    layers' initial weights are those fairseq-train builds with ``seed`` (default: the dense
    run's), so that this and ``--finetune-from-model DENSE.pt`` start from the same model.
    ``criterion``: the one the upcycled model will train with (default: the dense run's), which
    fairseq checks against the optimizer history before it goes on with the run."""
    from omegaconf import OmegaConf

    if not options.get("base_experts"):  # 0: one expert per worker of an expert-parallel group, as training on them
        options = dict(options, base_experts=options.get("base_expert_parallel_size") or world_size)
    state = read_checkpoint(path)
    check_finite(state, path)
    cfg = dense_config(state, path)
    torch.manual_seed((cfg.get("common") or {}).get("seed", 1) if seed is None else seed)
    model_cfg, model = build_upcycled(cfg, data, options)
    check_dictionary(state["model"], model, data or cfg["task"].get("data"))
    if not has_experts(model):
        raise UpcycleError("the options add no expert layer: pass --base-layers N and/or --base-moe-freq K")
    upcycled, origins = upcycle_mapping(state["model"], model)
    model.load_state_dict(upcycled)  # as fairseq will: every key, every shape
    cfg["model"] = OmegaConf.to_container(model_cfg, enum_to_str=True)
    cfg["distributed_training"] = dict(cfg.get("distributed_training") or {}, distributed_world_size=1)
    written = {"cfg": cfg, "model": model.state_dict(),
               **(dense_run_place(state, model.state_dict(), origins) or new_run_place(state))}
    if criterion:
        written["optimizer_history"][-1] = dict(written["optimizer_history"][-1],
                                                criterion_name=criterion_class_name(criterion))
    updates = num_updates(written)
    stamp(written, new_run_id(), updates)
    if world_size == 1:
        write_all_or_nothing([written], [out])
        return [out], updates
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out))) as tmp:
        one = os.path.join(tmp, "one.pt")
        torch.save(written, one)
        paths = reshard(one, world_size, out, options.get("base_expert_parallel_size", 0), report=lambda line: None)
        return paths, updates


def dense_run_place(state: dict, model_state: dict, origins) -> Optional[dict]:
    """The dense run's optimizer history (updates, learning-rate schedule), extra state (data
    position, meters) and optimizer state, moved to the upcycled model's parameters; None where
    its optimizer state cannot follow (none saved, several parameter groups, or one flat copy of
    every parameter, --fp16's and --bf16's, which new parameters would have to join)."""
    optim, entries = state.get("last_optimizer_state"), optimizer_state_by_name(state)
    if not optim or entries is None or len(optim["param_groups"][0]["params"]) == 1 < len(entries):
        return None
    moved = upcycle_optimizer_entries(entries, origins, parameter_names(model_state))
    return {"optimizer_history": state["optimizer_history"], "extra_state": dict(state.get("extra_state") or {}),
            "last_optimizer_state": regrouped(optim, moved)}


def criterion_class_name(name: str) -> str:
    """The class name fairseq's optimizer history keeps for the criterion registered as ``name``."""
    from fairseq.criterions import CRITERION_REGISTRY

    if name not in CRITERION_REGISTRY:
        raise UpcycleError(f"--criterion {name}: no such criterion; choose one of fairseq's (cross_entropy, "
                           f"base_cross_entropy, ...)")
    return CRITERION_REGISTRY[name].__name__


def new_run_place(state: dict) -> dict:
    """No optimizer state and no updates: a start for --finetune-from-model only."""
    history = dict((state.get("optimizer_history") or [{}])[-1], num_updates=0)
    return {"optimizer_history": [history], "extra_state": {}, "last_optimizer_state": None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairseq-base-upcycle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the dense transformer_lm checkpoint (fairseq-train's, one file)")
    parser.add_argument("--out", required=True, help="output name, e.g. base.pt (--world-size W > 1: base-rank-R.pt)")
    parser.add_argument("--world-size", type=int, default=1, help="number of workers to write for (default 1)")
    parser.add_argument("--data", help="the data directory the dense model was trained on (its dict.txt; "
                                       "default: the one its checkpoint names)")
    parser.add_argument("--seed", type=int, help="seeds the new layers' initial weights as fairseq-train --seed would "
                                                 "(default: the dense run's)")
    parser.add_argument("--criterion", help="the criterion the upcycled model will train with, for --continue-once "
                                            "(default: the dense run's; base_cross_entropy for switch and top2)")
    for field in model_fields():  # the model's options: the README's table
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=None,
                            help=f"{field.metadata['help']} (default {field.default!r})")
    return parser


def cli_main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    options = {f.name: getattr(args, f.name) for f in model_fields() if getattr(args, f.name) is not None}
    try:
        if args.world_size < 1:
            raise UpcycleError(f"--world-size must be >= 1, got {args.world_size}")
        written, updates = upcycle(args.checkpoint, args.out, options, args.data, args.world_size, args.seed,
                                   args.criterion)
    except BaseLayerConfigError as err:  # UpcycleError, and the checkpoint errors of checkpoints.py
        sys.exit(f"fairseq-base-upcycle: error: {err}")
    for path in written:
        print(f"| wrote {path}")
    goes_on = (f"--continue-once {args.out} to go on with the dense run at update {updates} (its data order, "
               f"schedule and optimizer state), or " if updates > 0 else "")
    print(f"| score it with fairseq-eval-lm DATA --user-dir fairseq_base --path {args.out}; train from it with "
          f"fairseq-train ... {goes_on}--finetune-from-model {args.out} to start a new run from it")


if __name__ == "__main__":
    cli_main()

"""fairseq-base-upcycle: start a transformer_lm_base model from a dense fairseq transformer_lm
checkpoint (sparse upcycling, Komatsuzaki et al., ICLR 2023).

    fairseq-base-upcycle DENSE.pt --out BASE.pt --base-layers 1 --base-experts 8 [--world-size W]
    fairseq-train DATA --user-dir fairseq_base --arch transformer_lm_base ... --finetune-from-model DENSE.pt

The trunk is the dense model's: its decoder layers keep their parameters under the indices they
get once the expert layers are inserted. The upcycled model computes what the dense one did:

- an inserted BASE layer adds gate * (expert(h) - h) to h, and a new expert's last projection
  is zero, so the layer starts as the identity (its centroids keep their initial values);
- an expert feed-forward slot (``--base-moe-freq``) gets every expert as a copy of the slot's
  dense FFN block (its LayerNorm, fc1 and fc2) and the dense LayerNorm as its router's input
  norm. Its centroids start at zero, so that every token's gates are the same, g0 (0.5 for the
  sigmoid-gated routers balanced, sbase and lossfree; 1/E for switch; 1 for top-2 and hash,
  whose gates add up to 1); each expert's last projection is divided by g0. The slot then adds
  g0 * FFN(x) / g0 = FFN(x), as the dense layer did (exactly where g0 is a power of two).
  The experts are copies, so which expert a token gets changes nothing until training moves
  them apart; with all scores equal, switch and top-2 send every first choice to expert 0 in
  training and drop tokens over capacity until the centroids separate.

fairseq's ``--finetune-from-model DENSE.pt`` with ``--arch transformer_lm_base`` does the same
when the model loads (``TransformerLanguageModelBase.load_state_dict``).
"""

import argparse
import os
import sys
import tempfile
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from fairseq_base.checkpoints import check_finite, new_run_id, read_checkpoint, stamp
from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.experts import EXPERT_IDS
from fairseq_base.fairseq_patches.which_models import has_experts
from fairseq_base.layer import BaseLayer
from fairseq_base.options import model_fields

TRUNK = "decoder.layers."
# A dense layer's feed-forward block: what an expert feed-forward slot takes from it.
FFN_BLOCK = ("final_layer_norm.", "fc1.", "fc2.")


class UpcycleError(BaseLayerConfigError):
    pass


def state_has_experts(state_dict: Dict[str, Tensor]) -> bool:
    """Whether a model's state dict holds expert layers (this plugin's, of any version)."""
    return any(key.endswith(EXPERT_IDS) or ".experts." in key for key in state_dict)


def _decoder_layer_count(state_dict: Dict[str, Tensor]) -> int:
    indices = {int(key[len(TRUNK):].split(".", 1)[0]) for key in state_dict if key.startswith(TRUNK)}
    return max(indices) + 1 if indices else 0


def gate_at_start(layer: BaseLayer) -> float:
    """The gates of a token's choices, summed, at inference when every score is zero (an upcycled
    slot's start: zero centroids)."""
    was_training = layer.training
    layer.eval()
    if not layer.record.reads_scores:
        layer.token_ids = torch.zeros(1, 1, dtype=torch.long)
    embed_dim = layer.experts.sublayers[0].norm_weight.size(1)
    routing, _ = layer.route(torch.zeros(1, embed_dim))
    if not layer.record.reads_scores:
        layer.token_ids = None
    layer.train(was_training)
    return float(routing.gates.sum())


def upcycle_state(dense: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """``model``'s state dict (a transformer_lm_base, any layout) with the dense model's parameters
    in its trunk and its expert feed-forward slots filled from the dense FFN blocks (see the module
    docstring). Raises ``UpcycleError`` where the dense model does not fit the options."""
    from fairseq_base.models.transformer_lm_base import ExpertFeedForwardLayer

    target = model.state_dict()
    upcycled = dict(target)
    used = set()

    def take(source_key: Optional[str], target_key: str, value: Optional[Tensor] = None) -> None:
        """``upcycled[target_key]`` from the dense model's ``source_key`` (or ``value`` made from it)."""
        value = dense[source_key] if value is None else value
        if tuple(value.shape) != tuple(target[target_key].shape):
            raise UpcycleError(
                f"{source_key} of the dense model has shape {tuple(value.shape)} but the options give "
                f"{target_key} {tuple(target[target_key].shape)}: pass the dense model's own trunk options "
                f"(--decoder-embed-dim, --decoder-ffn-embed-dim, ...) or none")
        upcycled[target_key] = value.to(target[target_key].dtype)
        if source_key is not None:
            used.add(source_key)

    layers = model.decoder.layers
    trunk = [j for j, layer in enumerate(layers) if not isinstance(layer, BaseLayer)]
    dense_layers = _decoder_layer_count(dense)
    if dense_layers != len(trunk):
        raise UpcycleError(f"the dense model has {dense_layers} decoder layers but the options give {len(trunk)}: "
                           f"pass --decoder-layers {dense_layers} (or none)")
    for key in dense:
        if not key.startswith(TRUNK):
            if key not in target:
                raise UpcycleError(f"the dense model's {key} has no place in transformer_lm_base: it is not a "
                                   f"transformer_lm, or was built with options the plugin does not take")
            take(key, key)
    for source_index, j in enumerate(trunk):
        source, layer = f"{TRUNK}{source_index}.", layers[j]
        slot = isinstance(layer, ExpertFeedForwardLayer)
        destination = f"{TRUNK}{j}.attention." if slot else f"{TRUNK}{j}."
        for key in [k for k in dense if k.startswith(source)]:
            rest = key[len(source):]
            if slot and rest.startswith(FFN_BLOCK):
                continue
            if destination + rest not in target:
                raise UpcycleError(f"the dense model's {key} has no place in transformer_lm_base "
                                   f"({destination + rest}): a decoder layer the plugin does not build")
            take(key, destination + rest)
        if slot:
            _fill_slot(dense, source, f"{TRUNK}{j}.moe.", layer.moe, take)
    unused = sorted(set(dense) - used)
    if unused:
        raise UpcycleError(f"the dense model's {', '.join(unused[:3])} have no place in the upcycled model: its "
                           f"feed-forward blocks are not fairseq's LayerNorm, fc1, fc2")
    return upcycled


def _fill_slot(dense, source: str, prefix: str, moe: BaseLayer, take) -> None:
    """Every local expert of ``moe`` a copy of the dense FFN block at ``source``, its last
    projection divided by the gates a token gets at zero centroids; the router's input norm the
    block's LayerNorm; the centroids zero (``moe``'s own too: ``gate_at_start`` routes with them)."""
    if moe.record.reads_scores:
        with torch.no_grad():
            moe.centroids.zero_()
        take(None, prefix + "centroids", moe.centroids.detach().clone())
    scale = 1.0 / gate_at_start(moe)
    if moe.score_norm is not None:  # hash reads no scores
        take(source + "final_layer_norm.weight", prefix + "score_norm.weight")
        take(source + "final_layer_norm.bias", prefix + "score_norm.bias")
    # expert parameter <- (dense key, factor, transposed: the experts store projections as [in, out])
    copies = {"norm_weight": ("final_layer_norm.weight", 1.0, False),
              "norm_bias": ("final_layer_norm.bias", 1.0, False),
              "ff1_weight": ("fc1.weight", 1.0, True), "ff1_bias": ("fc1.bias", 1.0, False),
              "ff2_weight": ("fc2.weight", scale, True), "ff2_bias": ("fc2.bias", scale, False)}
    for name, (key, factor, transposed) in copies.items():
        value = dense[source + key]
        value = (value.t() if transposed else value) * factor
        take(source + key, f"{prefix}experts.sublayers.0.{name}",
             value.unsqueeze(0).expand(moe.experts.num_experts, *value.shape).contiguous())


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

    from fairseq_base.models.transformer_lm_base import TransformerLanguageModelBaseConfig

    task_cfg = dict(cfg["task"], data=data or cfg["task"].get("data"))
    dictionary = os.path.join(str(task_cfg["data"]).split(os.pathsep)[0], "dict.txt")
    if not os.path.isfile(dictionary):
        raise UpcycleError(f"{dictionary} does not exist: pass --data DIR, the data directory (with its dict.txt) "
                           f"the dense model was trained on")
    model_cfg = dict(cfg["model"], **options, _name="transformer_lm_base")
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
            seed: Optional[int] = None) -> List[str]:
    """Write the upcycled checkpoint of the dense ``path`` to ``out`` (``out``-rank-R.pt for
    ``world_size`` > 1, as training on that many workers writes it); the paths written. The new
    layers' initial weights are those fairseq-train builds with ``seed`` (default: the dense
    run's), so that this and ``--finetune-from-model DENSE.pt`` start from the same model."""
    from omegaconf import OmegaConf

    from fairseq_base.reshard import reshard, write_all_or_nothing

    state = read_checkpoint(path)
    check_finite(state, path)
    cfg = dense_config(state, path)
    torch.manual_seed((cfg.get("common") or {}).get("seed", 1) if seed is None else seed)
    model_cfg, model = build_upcycled(cfg, data, options)
    check_dictionary(state["model"], model, data or cfg["task"].get("data"))
    if not has_experts(model):
        raise UpcycleError("the options add no expert layer: pass --base-layers N and/or --base-moe-freq K")
    upcycled = upcycle_state(state["model"], model)
    model.load_state_dict(upcycled)  # as fairseq will: every key, every shape
    cfg["model"] = OmegaConf.to_container(model_cfg, enum_to_str=True)
    cfg["distributed_training"] = dict(cfg.get("distributed_training") or {}, distributed_world_size=1)
    # No optimizer state (none fits the new parameters): train from it with --finetune-from-model.
    history = dict((state.get("optimizer_history") or [{}])[-1], num_updates=0)
    written = {"cfg": cfg, "model": model.state_dict(), "optimizer_history": [history], "extra_state": {},
               "last_optimizer_state": None}
    stamp(written, new_run_id(), 0)
    if world_size == 1:
        write_all_or_nothing([written], [out])
        return [out]
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out))) as tmp:
        one = os.path.join(tmp, "one.pt")
        torch.save(written, one)
        return reshard(one, world_size, out, options.get("base_expert_parallel_size", 0))


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
        written = upcycle(args.checkpoint, args.out, options, args.data, args.world_size, args.seed)
    except BaseLayerConfigError as err:  # UpcycleError, and the checkpoint errors of checkpoints.py
        sys.exit(f"fairseq-base-upcycle: error: {err}")
    for path in written:
        print(f"| wrote {path}")
    print(f"| score it with fairseq-eval-lm DATA --user-dir fairseq_base --path {args.out}; train from it with "
          f"fairseq-train ... --finetune-from-model {args.out}")


if __name__ == "__main__":
    cli_main()

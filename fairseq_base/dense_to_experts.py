"""A dense transformer_lm's state dict mapped onto a model with expert layers (sparse upcycling,
Komatsuzaki et al., ICLR 2023), which then computes what the dense model did; a pure transform of
state dicts, used by ``fairseq-base-upcycle`` (``upcycle.py``) and by the model's
``load_state_dict`` (``--finetune-from-model DENSE.pt``).

The trunk is the dense model's: its decoder layers keep their parameters under the indices they
get once the expert layers are inserted. Then:

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
"""

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.expert_ffn import ExpertFeedForwardLayer
from fairseq_base.experts import EXPERT_IDS
from fairseq_base.layer import BaseLayer
from fairseq_base.optimizer_state import per_element

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


@dataclass(frozen=True)
class Origin:
    """Where an upcycled parameter comes from: the dense model's ``key``, transposed (the experts
    store projections as [in, out]), times ``factor``, and stacked once per local expert
    (``copies``; 0: as it is)."""

    key: str
    factor: float = 1.0
    transposed: bool = False
    copies: int = 0

    def apply(self, value: Tensor, power: int = 1) -> Tensor:
        """``value`` (the parameter, or per-element optimizer state that scales as its ``power``)."""
        value = (value.t() if self.transposed else value) * self.factor ** power
        return value.unsqueeze(0).expand(self.copies, *value.shape).contiguous() if self.copies else value


# How per-element optimizer state scales with its parameter: the gradient of factor * w is the
# gradient of w over factor, its moving mean likewise, its moving square over factor squared.
MOMENT_POWERS = {"exp_avg": -1, "momentum_buffer": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2}


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
    return upcycle_mapping(dense, model)[0]


def upcycle_mapping(dense: Dict[str, Tensor], model: nn.Module) -> Tuple[Dict[str, Tensor], Dict[str, Origin]]:
    """``upcycle_state``, and the ``Origin`` of each entry taken from the dense model."""
    target = model.state_dict()
    upcycled, origins = dict(target), {}

    def take(origin: Origin, target_key: str) -> None:
        """``upcycled[target_key]`` from the dense model, as ``origin`` says."""
        value = origin.apply(dense[origin.key])
        if tuple(value.shape) != tuple(target[target_key].shape):
            raise UpcycleError(
                f"{origin.key} of the dense model has shape {tuple(dense[origin.key].shape)} but the options give "
                f"{target_key} {tuple(target[target_key].shape)}: pass the dense model's own trunk options "
                f"(--decoder-embed-dim, --decoder-ffn-embed-dim, ...) or none")
        upcycled[target_key] = value.to(target[target_key].dtype)
        origins[target_key] = origin

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
            take(Origin(key), key)
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
            take(Origin(key), destination + rest)
        if slot:
            upcycled.update(_fill_slot(source, f"{TRUNK}{j}.moe.", layer.moe, take))
    unused = sorted(set(dense) - {origin.key for origin in origins.values()})
    if unused:
        raise UpcycleError(f"the dense model's {', '.join(unused[:3])} have no place in the upcycled model: its "
                           f"feed-forward blocks are not fairseq's LayerNorm, fc1, fc2")
    return upcycled, origins


def _fill_slot(source: str, prefix: str, moe: BaseLayer, take) -> Dict[str, Tensor]:
    """Every local expert of ``moe`` a copy of the dense FFN block at ``source``, its last
    projection divided by the gates a token gets at zero centroids; the router's input norm the
    block's LayerNorm. Returns the new centroids, zero (``moe``'s own too: ``gate_at_start``
    routes with them)."""
    centroids = {}
    if moe.record.reads_scores:
        with torch.no_grad():
            moe.centroids.zero_()
        centroids[prefix + "centroids"] = moe.centroids.detach().clone()
    scale, copies = 1.0 / gate_at_start(moe), moe.experts.num_experts
    if moe.score_norm is not None:  # hash reads no scores
        take(Origin(source + "final_layer_norm.weight"), prefix + "score_norm.weight")
        take(Origin(source + "final_layer_norm.bias"), prefix + "score_norm.bias")
    # expert parameter <- (dense key, factor, transposed)
    parts = {"norm_weight": ("final_layer_norm.weight", 1.0, False),
             "norm_bias": ("final_layer_norm.bias", 1.0, False),
             "ff1_weight": ("fc1.weight", 1.0, True), "ff1_bias": ("fc1.bias", 1.0, False),
             "ff2_weight": ("fc2.weight", scale, True), "ff2_bias": ("fc2.bias", scale, False)}
    for name, (key, factor, transposed) in parts.items():
        take(Origin(source + key, factor, transposed, copies), f"{prefix}experts.sublayers.0.{name}")
    return centroids


def upcycle_optimizer_entries(dense_entries: Dict[str, dict], origins: Dict[str, Origin],
                              names: List[str]) -> List[dict]:
    """The optimizer state of the upcycled model's parameters ``names`` (in its order), from the
    dense run's (``optimizer_state.state_by_name``): a parameter taken from the dense model takes
    its state as ``Origin`` maps the parameter (experts: a copy each); a new one (centroids, a BASE
    layer's experts) and one whose state cannot be rescaled start with none, as a new parameter
    would."""
    entries = []
    for name in names:
        origin, entry = origins.get(name), dense_entries.get(origins[name].key, {}) if name in origins else {}
        scalable = all(key in MOMENT_POWERS for key, value in entry.items() if per_element(value))
        if origin is None or not entry or (origin.factor != 1 and not scalable):
            entries.append({})
            continue
        entries.append({key: origin.apply(value, MOMENT_POWERS.get(key, 0)) if per_element(value) else value
                        for key, value in entry.items()})
    return entries

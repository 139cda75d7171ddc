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

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.expert_ffn import ExpertFeedForwardLayer
from fairseq_base.experts import EXPERT_IDS
from fairseq_base.layer import BaseLayer

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

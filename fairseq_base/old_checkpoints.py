"""Checkpoints written before the local experts were stacked (one module per expert): read as if
written now.

Before, expert j of a layer kept sublayer s as ``{layer}experts.{j}.{s}.{norm,ff1,ff2}.{weight,bias}``;
now the layer's experts keep ``{layer}experts.sublayers.{s}.{norm,ff1,ff2}_{weight,bias}``,
with expert j at index j of the leading dimension (``experts.SUBLAYER_PARAMETERS``), and the
projections' weights transposed (nn.Linear's [out, in] became [in, out]).
``upgrade(state)`` rewrites the model and the optimizer state of such a checkpoint in
place. fairseq's optimizers keep either one state per parameter, in the order of the
model's parameters, or (--fp16, --bf16) one flat state over all of them in that order;
both are regrouped the way the parameters are. Checkpoints of other models, and of this
one since, are left as they are.
"""

import logging
import re
from collections import OrderedDict
from typing import Dict, List, Optional

import torch

from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.experts import EXPERT_IDS, SUBLAYER_PARAMETERS

logger = logging.getLogger(__name__)
OLD_EXPERT_KEY = re.compile(r"^(?P<layer>.*?)experts\.(?P<expert>\d+)\.(?P<sublayer>\d+)\."
                            r"(?P<module>norm|ff1|ff2)\.(?P<param>weight|bias)$")
# Buffers of transformer_lm_base: every other state-dict entry is a parameter.
BUFFER_SUFFIXES = (EXPERT_IDS, "decoder.version", "_float_tensor", "hash_table", "expert_bias", "bias_on_affinity")


def is_buffer(name: str) -> bool:
    return name.endswith(BUFFER_SUFFIXES)


def parameter_names(model: dict) -> List[str]:
    """The names of the model's parameters in a state dict, in the order of ``model.parameters()``,
    which fairseq's optimizer state follows: buffers left out, and a tied tensor (the shared
    input and output embeddings) counted once."""
    names, seen = [], set()
    for name, value in model.items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if not is_buffer(name) and key not in seen:
            seen.add(key)
            names.append(name)
    return names


def upgrade(state: dict) -> bool:
    """Rewrite ``state`` (a checkpoint: "model" and "last_optimizer_state") from the per-expert
    layout to the stacked one; whether there was anything to rewrite."""
    model = state.get("model")
    if not model:
        return False
    stacked = _stacked_names(model)
    if not stacked:
        return False
    old_params = [(name, model[name].shape) for name in parameter_names(model)]
    upgraded = OrderedDict()
    for name, value in model.items():
        target = stacked.get(name)
        if target is None:
            upgraded[name] = value
        elif target[0] not in upgraded:  # at the layer's first expert entry: all of its stacked entries
            for new_name, sources in target[1].items():
                upgraded[new_name] = torch.stack([_new_layout(new_name, model[source]) for source in sources])
    state["model"] = upgraded
    groups = {name: sources for _, layer in stacked.values() for name, sources in layer.items()}
    new_params = parameter_names(upgraded)
    if state.get("last_optimizer_state"):
        state["last_optimizer_state"] = _upgrade_optimizer_state(state["last_optimizer_state"], old_params,
                                                                 new_params, groups)
    return True


def _stacked_names(model) -> Dict[str, tuple]:
    """{old expert key: (first new key of its layer, {new key: [old keys, expert 0 first]} of that
    layer)} for every layer of this plugin (it has ``expert_ids``) saved in the per-expert layout."""
    layers: Dict[str, Dict[str, Dict[int, str]]] = {}
    for name in model:
        match = OLD_EXPERT_KEY.match(name)
        if match and match["layer"] + EXPERT_IDS in model:
            new_name = f"{match['layer']}experts.sublayers.{match['sublayer']}.{match['module']}_{match['param']}"
            layers.setdefault(match["layer"], {}).setdefault(new_name, {})[int(match["expert"])] = name
    found = {}
    for layer, entries in layers.items():
        num_sublayers = 1 + max(int(name.split(".")[-2]) for name in entries)
        order = [f"{layer}experts.sublayers.{s}.{p}" for s in range(num_sublayers) for p in SUBLAYER_PARAMETERS]
        if sorted(order) != sorted(entries):
            raise BaseLayerConfigError(f"{layer}experts: an incomplete expert in a checkpoint of the per-expert "
                                       f"layout (has {sorted(entries)})")
        grouped = {name: [entries[name][j] for j in sorted(entries[name])] for name in order}
        for sources in grouped.values():
            for source in sources:
                found[source] = (order[0], grouped)
    return found


def _upgrade_optimizer_state(optim: dict, old_params: List[tuple], new_params: List[str],
                             groups: Dict[str, List[str]]) -> Optional[dict]:
    """The optimizer state of ``old_params`` ([(name, shape)] in order) regrouped for ``new_params``."""
    by_name = state_by_name(optim, old_params)
    if by_name is None:
        logger.warning("fairseq_base: this checkpoint predates the stacked experts and its optimizer state (not "
                       "one state per parameter, or one flat state, in one parameter group) cannot be regrouped: it "
                       "is left out, and training from it starts a new optimizer state")
        return None
    return regrouped(optim, [stack_entries([{key: _new_layout(name, value) for key, value in by_name[source].items()}
                                            for source in groups[name]]) if name in groups else by_name[name]
                             for name in new_params])


def _new_layout(name: str, value):
    """An old expert tensor (or its optimizer state) as the stacked layout keeps it."""
    return value.t() if name.endswith(("ff1_weight", "ff2_weight")) and per_element(value) else value


def per_element(value) -> bool:
    return torch.is_tensor(value) and value.dim() > 0


def optimizer_state_by_name(state: dict) -> Optional[Dict[str, dict]]:
    """``state_by_name`` of a checkpoint's optimizer state and model."""
    model = state["model"]
    params = [(name, model[name].shape) for name in parameter_names(model)]
    return state_by_name(state.get("last_optimizer_state"), params)


def state_by_name(optim: Optional[dict], params: List[tuple]) -> Optional[Dict[str, dict]]:
    """The optimizer state of each of ``params`` ([(name, shape)], the model's parameters in
    order), per-parameter or flat; None where it cannot be mapped safely (several parameter
    groups, or a state shaped otherwise than its parameter, as Adafactor's factored one)."""
    groups = (optim or {}).get("param_groups", [])
    if len(groups) != 1:
        return None
    indices, state = groups[0]["params"], optim.get("state", {})
    if len(indices) == len(params):
        by_name = {name: state.get(index, {}) for (name, _), index in zip(params, indices)}
    elif len(indices) == 1:  # flat: each parameter's elements in turn
        flat_state, total = state.get(indices[0], {}), sum(shape.numel() for _, shape in params)
        if any(value.shape != (total,) for value in flat_state.values() if per_element(value)):
            return None
        by_name, offset = {}, 0
        for name, shape in params:
            size = shape.numel()
            by_name[name] = {key: value[offset:offset + size].view(shape) if per_element(value) else value
                             for key, value in flat_state.items()}
            offset += size
    else:
        return None
    shapes = dict(params)
    if any(value.shape != shapes[name] for name, entry in by_name.items() for value in entry.values()
           if per_element(value)):
        return None
    return by_name


def regrouped(optim: dict, entries: List[dict]) -> dict:
    """``optim`` (one parameter group) holding ``entries``, the state of each parameter in order:
    flat where ``optim`` is (the fp16 and bf16 optimizers' one fp32 copy of all parameters)."""
    group = optim["param_groups"][0]
    if len(group["params"]) == 1 and len(entries) > 1:
        flat = {key: torch.cat([entry[key].reshape(-1) for entry in entries]) if per_element(value) else value
                for key, value in optim["state"].get(group["params"][0], {}).items()}
        return dict(optim, state={group["params"][0]: flat})
    return dict(optim, state={i: entry for i, entry in enumerate(entries) if entry},
                param_groups=[dict(group, params=list(range(len(entries))))])


def stack_entries(entries: List[dict]) -> dict:
    """One optimizer entry for stacked parameters from the entries of the parameters stacked."""
    if not entries[0]:
        return {}
    return {key: torch.stack([entry[key] for entry in entries]) if per_element(value) else value
            for key, value in entries[0].items()}

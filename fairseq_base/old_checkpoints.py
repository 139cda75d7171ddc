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
from fairseq_base.optimizer_state import parameter_names, per_element, regrouped, stack_entries, state_by_name

logger = logging.getLogger(__name__)
OLD_EXPERT_KEY = re.compile(r"^(?P<layer>.*?)experts\.(?P<expert>\d+)\.(?P<sublayer>\d+)\."
                            r"(?P<module>norm|ff1|ff2)\.(?P<param>weight|bias)$")


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

"""Test helpers for the stacked local experts: one expert's weights, and a stand-in for them."""

import re
from collections import OrderedDict

import torch
from torch import nn

from fairseq_base.optimizer_state import parameter_names


def expert_weights(experts, j):
    """{name: local expert j's tensor} of ``LocalExperts`` (copies)."""
    return {name: param[j].detach().clone() for name, param in experts.named_parameters()}


def set_expert_weights(experts, j, weights):
    with torch.no_grad():
        for name, param in experts.named_parameters():
            param[j] = weights[name]


def expert_grads(experts, j):
    return [param.grad[j] for param in experts.parameters()]


class ScaledExperts(nn.Module):
    """Stands in for ``LocalExperts``: local expert j maps x to factors[j] x (its update is
    (factors[j] - 1) x), so that a token's output shows which expert it went to."""

    def __init__(self, factors):
        super().__init__()
        self.factors = factors

    def forward(self, tokens, tokens_per_expert):
        return torch.cat([(factor - 1) * chunk for factor, chunk in zip(self.factors, tokens.split(tokens_per_expert))])


STACKED_KEY = re.compile(r"^(?P<experts>.*experts\.)sublayers\.(?P<sublayer>\d+)\.(?P<module>norm|ff1|ff2)_"
                         r"(?P<param>weight|bias)$")


def per_expert_layout(state):
    """A copy of checkpoint ``state`` as the plugin wrote it before its experts were stacked:
    expert j's sublayer s under ``{layer}experts.{j}.{s}.{norm,ff1,ff2}.{weight,bias}``, expert by
    expert, projections as nn.Linear keeps them ([out, in]), and the optimizer state (one entry
    per parameter, or one flat entry) to match."""
    model, old_model, rows = state["model"], OrderedDict(), {}  # rows: old name -> (new name, j)
    layers = {}
    for name, value in model.items():
        match = STACKED_KEY.match(name)
        if match:
            layers.setdefault(match["experts"], []).append((name, match))
    for name, value in model.items():
        match = STACKED_KEY.match(name)
        if not match:
            old_model[name] = value
        elif name == layers[match["experts"]][0][0]:  # the layer's first stacked key: all of its experts
            entries = layers[match["experts"]]
            for j in range(value.size(0)):
                for new_name, m in entries:
                    old_name = f"{m['experts']}{j}.{m['sublayer']}.{m['module']}.{m['param']}"
                    old_model[old_name] = _old_layout(new_name, model[new_name][j]).clone()
                    rows[old_name] = (new_name, j)
    old = dict(state, model=old_model)
    optim = state.get("last_optimizer_state")
    if optim:
        new_names, old_names = parameter_names(model), parameter_names(old_model)
        group = optim["param_groups"][0]
        if len(group["params"]) == len(new_names):
            by_name = {name: optim["state"].get(i, {}) for name, i in zip(new_names, group["params"])}
            entries = [_row(by_name, rows.get(name, (name, None))) for name in old_names]
            old["last_optimizer_state"] = dict(optim, state={i: e for i, e in enumerate(entries) if e},
                                               param_groups=[dict(group, params=list(range(len(old_names))))])
        else:  # one flat entry: the parameters' elements in turn
            index = group["params"][0]
            flat, sizes = optim["state"][index], [model[name].numel() for name in new_names]
            parts = {key: dict(zip(new_names, value.split(sizes))) for key, value in flat.items()
                     if torch.is_tensor(value) and value.dim() > 0}
            regrouped = dict(flat)
            for key, by_name in parts.items():
                pieces = []
                for name in old_names:
                    new_name, j = rows.get(name, (name, None))
                    piece = by_name[new_name]
                    pieces.append(piece if j is None else
                                  _old_layout(new_name, piece.view(model[new_name].shape)[j]).reshape(-1))
                regrouped[key] = torch.cat(pieces)
            old["last_optimizer_state"] = dict(optim, state={index: regrouped})
    return old


def _row(by_name, source):
    name, j = source
    entry = by_name[name]
    if j is None:
        return entry
    return {k: _old_layout(name, v[j]).clone() if torch.is_tensor(v) and v.dim() > 0 else v
            for k, v in entry.items()}


def _old_layout(name, value):
    """nn.Linear's [out, in] for the projections, which the stacked layout keeps as [in, out]."""
    return value.t() if name.endswith(("ff1_weight", "ff2_weight")) else value

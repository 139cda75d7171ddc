"""Optimizer state by parameter name. fairseq's optimizers keep their state in the order of
``model.parameters()``: one entry per parameter, or (--fp16, --bf16) one flat entry over all of
them. A checkpoint's state dict names the parameters (and buffers) in that order, so the
optimizer state can be read per name, and written back per name or flat
(``fairseq-base-reshard``, and the converter of the per-expert layout in ``old_checkpoints``).
"""

from typing import Dict, List, Optional

import torch

from fairseq_base.experts import EXPERT_IDS

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

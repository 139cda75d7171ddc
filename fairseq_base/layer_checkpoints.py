"""How an expert layer reads its entries of a checkpoint (``BaseLayer._load_from_state_dict``):
the expert count checked against the model's, checkpoints of earlier versions routed as they were
trained, and a file that holds other workers' experts too narrowed to this worker's."""

import logging

import torch

from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.experts import EXPERT_IDS

logger = logging.getLogger(__name__)


def adapt_layer_state(layer, state_dict: dict, prefix: str) -> None:
    """Make ``state_dict``'s entries under ``prefix`` fit ``layer`` (a ``BaseLayer``), in place, or
    raise one line that says which option to pass."""
    check_expert_count(layer, state_dict, prefix)
    route_as_saved(layer, state_dict, prefix)
    saved_ids = state_dict.get(prefix + EXPERT_IDS)
    if saved_ids is not None and not torch.equal(saved_ids.cpu(), layer.expert_ids.cpu()):
        take_own_experts(layer, state_dict, prefix, saved_ids.tolist())


def check_expert_count(layer, state_dict: dict, prefix: str) -> None:
    saved = state_dict.get(prefix + "centroids")
    saved_experts = saved.size(0) if saved is not None else None
    table = state_dict.get(prefix + "hash_table")
    if table is not None and table.numel() > 0 and int(table.max()) >= layer.num_experts:
        saved_experts = int(table.max()) + 1  # a random hash of a large vocabulary uses every expert
    if saved_experts is not None and saved_experts != layer.num_experts:
        raise BaseLayerConfigError(
            f"{prefix.rstrip('.')}: the checkpoint has {saved_experts} experts but this model was built "
            f"with {layer.num_experts}; pass --base-experts {saved_experts} (for fairseq-eval-lm: "
            f"--model-overrides \"{{'base_experts': {saved_experts}}}\")")


def route_as_saved(layer, state_dict: dict, prefix: str) -> None:
    """Checkpoints written before the routers followed their references route as they were
    trained: lossfree's bias on the raw score (no ``bias_on_affinity`` saved), and expert FFN
    slots scoring the raw residual stream (no ``score_norm`` saved)."""
    name = prefix.rstrip(".")
    if layer.record.has_bias and prefix + "expert_bias" in state_dict \
            and prefix + "bias_on_affinity" not in state_dict:
        logger.info(f"fairseq_base: {name} routes as it was trained: lossfree's bias on the raw score "
                    f"(a checkpoint written before the bias moved to the sigmoid affinity)")
        state_dict[prefix + "bias_on_affinity"] = torch.tensor(False)
    if getattr(layer, "score_norm", None) is not None and prefix + "centroids" in state_dict \
            and not any(key.startswith(prefix + "score_norm.") for key in state_dict):
        logger.info(f"fairseq_base: {name} routes as it was trained: on the raw residual stream (a checkpoint "
                    f"written before expert FFN slots scored the normalised input)")
        layer.score_norm = None


def take_own_experts(layer, state_dict: dict, prefix: str, saved_ids) -> None:
    """Keep this worker's experts from a checkpoint that holds others too (e.g. one file for all)."""
    position = {global_id: j for j, global_id in enumerate(saved_ids)}
    mine = layer.expert_ids.tolist()
    if any(global_id not in position for global_id in mine):
        raise BaseLayerConfigError(
            f"{prefix.rstrip('.')}: this checkpoint file holds experts {saved_ids} but this worker needs "
            f"experts {mine}; run fairseq-base-reshard CKPT --world-size {layer.num_experts // len(mine)} "
            f"--out OUT.pt and load OUT.pt")
    rows = torch.tensor([position[global_id] for global_id in mine])
    for key in [k for k in state_dict if k.startswith(prefix + "experts.")]:  # stacked: expert j at row j
        state_dict[key] = state_dict[key].index_select(0, rows.to(state_dict[key].device))
    state_dict[prefix + EXPERT_IDS] = layer.expert_ids.clone()

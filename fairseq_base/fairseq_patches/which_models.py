"""Which models an adjustment acts on. Every adjustment leaves a model without experts as
fairseq leaves it, unless its module says otherwise (and then why)."""

from argparse import Namespace

from fairseq.dataclass.utils import convert_namespace_to_omegaconf


def has_experts(model) -> bool:
    """A built model with expert parameters (BASE layers or expert FFNs, ours or fairseq's)."""
    return any(hasattr(param, "expert") for param in model.parameters())


def has_expert_options(model_cfg) -> bool:
    """A model configuration that asks for experts (ours, or fairseq's own ``--base-layers``)."""
    return (getattr(model_cfg, "base_layers", 0) or 0) > 0 or (getattr(model_cfg, "base_moe_freq", 0) or 0) > 0


def is_expert_model(model_cfg) -> bool:
    """transformer_lm_base with experts (fairseq's own ``--base-layers`` models are left to fairseq)."""
    return has_expert_options(model_cfg) and getattr(model_cfg, "base_expert_parallel_size", None) is not None


def as_config(cfg):
    """fairseq's configuration from what its entry points accept: a DictConfig, or an argparse
    Namespace converted as fairseq converts it."""
    return convert_namespace_to_omegaconf(cfg) if isinstance(cfg, Namespace) else cfg

"""Which models an adjustment acts on. Every adjustment leaves a model without experts as
fairseq leaves it, unless its module says otherwise (and then why).

Each decision reads facts of known type: a built ``torch.nn.Module``, or configuration values
checked to be whole numbers. Anything else (fairseq's own unit tests build trainers and
configurations from ``MagicMock``) is "not ours", and fairseq's function runs unchanged."""

from argparse import Namespace

from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq_base.experts import has_experts  # noqa: F401  (beside the decisions on configurations below)


def _whole_number(model_cfg, name: str):
    """``model_cfg.name`` if it is a whole number (not a bool), else None."""
    value = getattr(model_cfg, name, None) if model_cfg is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def has_expert_options(model_cfg) -> bool:
    """A model configuration that asks for experts (ours, or fairseq's own ``--base-layers``)."""
    return (_whole_number(model_cfg, "base_layers") or 0) > 0 or (_whole_number(model_cfg, "base_moe_freq") or 0) > 0


def is_expert_model(model_cfg) -> bool:
    """transformer_lm_base with experts (fairseq's own ``--base-layers`` models are left to fairseq)."""
    return has_expert_options(model_cfg) and _whole_number(model_cfg, "base_expert_parallel_size") is not None


def as_config(cfg):
    """fairseq's configuration from what its entry points accept: a DictConfig, or an argparse
    Namespace converted as fairseq converts it."""
    return convert_namespace_to_omegaconf(cfg) if isinstance(cfg, Namespace) else cfg

"""``transformer_lm_base``: fairseq's transformer_lm with BASE layers between decoder layers."""

import contextlib
from dataclasses import dataclass, field

import torch.distributed as dist
from fairseq.dataclass import ChoiceEnum
from fairseq.distributed import utils as distributed_utils
from fairseq.models import register_model
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig
from omegaconf import II
from torch import nn

from fairseq_base.dispatcher import world_size
from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.layer import BaseLayer
from fairseq_base.placement import base_layer_positions
from fairseq_base.router import ROUTERS

EVAL_ROUTING_CHOICES = ChoiceEnum(["greedy", "balanced"])


@dataclass
class TransformerLanguageModelBaseConfig(TransformerLanguageModelConfig):
    base_layers: int = field(default=1, metadata={"help": "number of BASE layers"})
    base_sublayers: int = field(default=1, metadata={"help": "feed-forward sublayers in each expert"})
    base_shuffle: int = field(
        default=1, metadata={"help": "1: send tokens to random workers before routing, as in the paper"})
    base_experts: int = field(
        default=0, metadata={"help": "experts per BASE layer; 0: one per distributed worker (the paper)"})
    base_positions: str = field(
        default="",
        metadata={"help": "comma-separated decoder layers after which BASE layers go ('L' = last); "
                          "default: after layers floor(i*L/(N+1)), i = 1..N"})
    base_eval_routing: EVAL_ROUTING_CHOICES = field(
        default="greedy", metadata={"help": "routing outside training: greedy top-1 (the paper) or balanced"})
    # As fairseq's base_lm_architecture sets them for its named LM architectures: input and
    # output dimensions follow the model dimension, and pre-LayerNorm (also the paper's).
    decoder_input_dim: int = field(default=II("model.decoder_embed_dim"), metadata={"help": "decoder input dimension"})
    decoder_output_dim: int = field(default=II("model.decoder_embed_dim"), metadata={"help": "decoder output dimension"})
    decoder_normalize_before: bool = field(default=True, metadata={"help": "apply layernorm before each decoder block"})


@contextlib.contextmanager
def _without_fairseq_base_layers(cfg):
    """fairseq's decoder inserts its own BaseLayer when base_layers > 0; build the trunk without it."""
    saved = cfg.base_layers
    cfg.base_layers = 0
    try:
        yield
    finally:
        cfg.base_layers = saved


def resolve_num_experts(base_experts: int, workers: int) -> int:
    if base_experts < 0:
        raise BaseLayerConfigError(f"--base-experts must be >= 0 (0: one per worker), got {base_experts}")
    num_experts = base_experts or workers
    if num_experts % workers != 0:
        raise BaseLayerConfigError(
            f"--base-experts {num_experts} cannot be split over {workers} workers; "
            f"use a multiple of {workers} (or 0 for one expert per worker)")
    return num_experts


@register_model("transformer_lm_base", dataclass=TransformerLanguageModelBaseConfig)
class TransformerLanguageModelBase(TransformerLanguageModel):
    @classmethod
    def build_model(cls, args, task):
        if args.base_sublayers < 1:
            raise BaseLayerConfigError(f"--base-sublayers must be >= 1, got {args.base_sublayers}")
        if args.base_eval_routing not in ROUTERS:
            raise BaseLayerConfigError(
                f"--base-eval-routing must be one of greedy, balanced; got {args.base_eval_routing!r}")
        if args.base_layers > 0 and args.decoder_layerdrop > 0:
            raise BaseLayerConfigError(
                "--decoder-layerdrop would skip BASE layers on some workers only; set --decoder-layerdrop 0")
        group = distributed_utils.get_data_parallel_group() if dist.is_initialized() else None
        num_experts = resolve_num_experts(args.base_experts, world_size(group))

        with _without_fairseq_base_layers(args):
            model = super().build_model(args, task)
        decoder = model.decoder
        trunk = list(decoder.layers)  # fewer than --decoder-layers with --decoder-layers-to-keep
        positions = base_layer_positions(len(trunk), args.base_layers, args.base_positions)
        layers = []
        for after in range(len(trunk) + 1):
            if after in positions:
                layers.append(BaseLayer(
                    args.decoder_embed_dim, args.decoder_ffn_embed_dim, num_experts,
                    num_sublayers=args.base_sublayers, activation_fn=args.activation_fn,
                    eval_routing=args.base_eval_routing, shuffle=bool(args.base_shuffle), group=group,
                    name=f"base{len(layers) - after + 1}"))
            if after < len(trunk):
                layers.append(trunk[after])
        decoder.layers = nn.ModuleList(layers)
        decoder.num_layers = len(layers)
        _divide_expert_grads_like_ddp(model, world_size(group))
        return model


def _divide_expert_grads_like_ddp(model, workers: int) -> None:
    """Divide expert gradients by the number of workers, as DDP divides the shared ones.

    fairseq's trainer multiplies every gradient by W / (global sample size) after the
    all-reduce, which legacy_ddp performs on shared parameters only. An expert's gradient
    already sums over every worker's tokens (they reach it by all-to-all), so without this
    it would end up W times too large.
    """
    if workers > 1:
        for param in model.parameters():
            if getattr(param, "expert", False):
                param.register_hook(lambda grad: grad / workers)

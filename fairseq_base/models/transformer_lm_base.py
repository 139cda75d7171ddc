"""``transformer_lm_base``: fairseq's transformer_lm with BASE layers between decoder layers."""

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq import hub_utils
from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model
from fairseq.models.transformer import TransformerDecoder
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig
from omegaconf import II
from torch import Tensor, nn

from fairseq_base.dense_to_experts import state_has_experts, upcycle_state
from fairseq_base.dispatcher import SizeExchange
from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.expert_ffn import ExpertFeedForwardLayer
from fairseq_base.experts import has_experts
from fairseq_base.groups import expert_layout, resolve_num_experts
from fairseq_base.hub import ExpertsHubInterface, own_checkpoint_file
from fairseq_base.layer import BaseLayer, BaseLayerConfig
from fairseq_base.lockstep import begin_forward
from fairseq_base.placement import base_layer_positions
from fairseq_base.router import EVAL_ROUTING, GATES, HASHES, ROUTER, ROUTER_RECORDS

logger = logging.getLogger(__name__)
EVAL_ROUTINGS = tuple(EVAL_ROUTING)
EVAL_ROUTING_CHOICES = ChoiceEnum(list(EVAL_ROUTINGS))
ROUTER_CHOICES = ChoiceEnum(list(ROUTER))
TOP2_SECOND_CHOICES = ChoiceEnum(["sampled", "greedy"])
HASH_CHOICES = ChoiceEnum(list(HASHES))
GATE_CHOICES = ChoiceEnum(list(GATES))
LAYER_DEFAULTS = BaseLayerConfig()
DROPPING = [record for record in ROUTER_RECORDS if record.drops_tokens]


@dataclass
class TransformerLanguageModelBaseConfig(TransformerLanguageModelConfig):
    base_layers: int = field(default=1, metadata={"help": "number of BASE layers; 0 gives the dense transformer_lm"})
    base_sublayers: int = field(default=LAYER_DEFAULTS.num_sublayers, metadata={"help": "residual feed-forward sublayers per expert (the paper's BASE layer has 10)"})
    base_shuffle: int = field(
        default=int(LAYER_DEFAULTS.shuffle), metadata={"help": "1: route each token on a random worker, so that every balanced assignment sees a "
                                     "sample of the whole batch (the paper); no effect in one process"})
    base_experts: int = field(
        default=0, metadata={"help": "E, experts per expert layer; 0: one per worker of an expert-parallel group "
                                     "(the paper: one per worker). In one process all E live in that process"})
    base_expert_parallel_size: int = field(
        default=0,
        metadata={"help": "P: each group of P consecutive workers holds all experts, E/P each, and routes its "
                          "tokens inside itself; W/P workers hold each expert. 0: all workers (the paper)"})
    base_positions: str = field(
        default="",
        metadata={"help": "comma-separated decoder layers after which BASE layers go, 0..L ('L' = the last: "
                          "BASE Top); empty: after layers floor(i*L/(N+1)), i = 1..N (6, 12, 18 for L = 24, N = 3)"})
    base_eval_routing: EVAL_ROUTING_CHOICES = field(
        default=LAYER_DEFAULTS.eval_routing,
        metadata={"help": "routing of BASE (and S-BASE) outside training: greedy top-1 (the paper) or balanced"})
    base_router: ROUTER_CHOICES = field(
        default=LAYER_DEFAULTS.router,
        metadata={"help": "; ".join(f"{record.name}: {record.summary}" for record in ROUTER_RECORDS)})
    base_top2_second: TOP2_SECOND_CHOICES = field(
        default=LAYER_DEFAULTS.top2_second,
        metadata={"help": "top2: the second expert in training, sampled from the softmax of the other experts "
                          "(fairseq's MoE default) or the runner-up (greedy); inference always takes the runner-up"})
    base_hash: HASH_CHOICES = field(
        default=LAYER_DEFAULTS.hash,
        metadata={"help": "hash: random (a random expert per token id, as the paper's released code) or balanced "
                          "(the most frequent tokens of dict.txt first, each to the expert with the smallest total "
                          "count so far)"})
    base_gate: GATE_CHOICES = field(
        default=LAYER_DEFAULTS.gate,
        metadata={"help": "router: each router's own gate, as published; one: every token's update at weight 1 (top2's "
                          "two choices 1/2 each), each gate keeping the gradient of the router's own (1 + g - "
                          "g.detach()): an ablation that separates a router's choices from its gate's size, no "
                          "paper's method; hash is unchanged"})
    base_bias_update_rate: float = field(
        default=LAYER_DEFAULTS.bias_update_rate,
        metadata={"help": "lossfree: the bias of each expert moves by this much per optimizer step, up if it "
                          "received fewer tokens than the mean, down if more"})
    base_capacity_factor: float = field(
        default=LAYER_DEFAULTS.capacity_factor,
        metadata={"help": f"C, {' and '.join(r.name for r in DROPPING)}: in training an expert takes at most "
                          f"ceil(C*T/E) (token, choice) pairs of a worker's T tokens; 0: the paper's ("
                          f"{', '.join(f'{r.name} {r.default_capacity}' for r in DROPPING)})"})
    base_balance_loss: float = field(
        default=0.01,
        metadata={"help": "switch and top2: weight A of the balance loss A*E*sum_i f_i*P_i, averaged over the expert "
                          "layers as fairseq's MoE criterion (needs --criterion base_cross_entropy)"})
    base_moe_freq: int = field(
        default=0,
        metadata={"help": "the feed-forward block of every K-th decoder layer becomes an expert layer routed "
                          "by --base-router (2: the paper's MoE and Switch baselines); 0: none"})
    # As fairseq's base_lm_architecture sets them for its named LM architectures: input and
    # output dimensions follow the model dimension, and pre-LayerNorm (also the paper's).
    decoder_input_dim: int = field(default=II("model.decoder_embed_dim"), metadata={"help": "decoder input dimension"})
    decoder_output_dim: int = field(default=II("model.decoder_embed_dim"), metadata={"help": "decoder output dimension"})
    # (fairseq makes a bool option whose default is True a store_false flag; add_args below makes
    # --decoder-normalize-before mean what it says, and --no-decoder-normalize-before turn it off.)
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


def check_options(args, num_experts: int) -> None:
    """Refuse option combinations that would build a different model than asked for."""
    if args.base_sublayers < 1:
        raise BaseLayerConfigError(f"--base-sublayers must be >= 1, got {args.base_sublayers}")
    if args.base_shuffle not in (0, 1):
        raise BaseLayerConfigError(f"--base-shuffle must be 0 or 1, got {args.base_shuffle}")
    if args.base_eval_routing not in EVAL_ROUTINGS:
        raise BaseLayerConfigError(
            f"--base-eval-routing must be one of {', '.join(EVAL_ROUTINGS)}; got {args.base_eval_routing!r}")
    if args.base_layers > 0 and args.decoder_layerdrop > 0:
        raise BaseLayerConfigError(
            "--decoder-layerdrop would skip BASE layers on some workers only; set --decoder-layerdrop 0")
    if args.base_moe_freq < 0:
        raise BaseLayerConfigError(f"--base-moe-freq must be >= 0 (0: no expert FFNs), got {args.base_moe_freq}")
    if args.base_moe_freq > 0 and not args.decoder_normalize_before:
        raise BaseLayerConfigError("--base-moe-freq builds pre-LayerNorm expert blocks; remove "
                                   "--no-decoder-normalize-before (Hydra: model.decoder_normalize_before=true)")
    for option, value in (("--base-capacity-factor", args.base_capacity_factor),
                          ("--base-balance-loss", args.base_balance_loss),
                          ("--base-bias-update-rate", getattr(args, "base_bias_update_rate", 1e-3))):
        if value < 0:
            raise BaseLayerConfigError(f"{option} must be >= 0, got {value}")
    record = ROUTER[args.base_router]
    if args.base_capacity_factor > 0 and not record.drops_tokens:
        raise BaseLayerConfigError(
            f"--base-capacity-factor applies to --base-router {' or '.join(r.name for r in DROPPING)}, not "
            f"{args.base_router} (which drops no tokens); remove it or choose one of those routers")
    if num_experts < record.choices:
        raise BaseLayerConfigError(f"--base-router {record.name} needs at least {record.choices} experts; raise "
                                   f"--base-experts")


def check_expert_memory(args, num_experts: int, expert_parallel_size: int) -> None:
    """Refuse, before building them, experts whose float32 weights would not fit in this machine's memory."""
    layers = args.base_layers * args.base_sublayers + (args.decoder_layers // args.base_moe_freq if args.base_moe_freq
                                                       else 0)
    per_expert_sublayer = 2 * args.decoder_embed_dim * args.decoder_ffn_embed_dim + 3 * args.decoder_embed_dim \
        + args.decoder_ffn_embed_dim
    needed = 4 * layers * (num_experts // expert_parallel_size) * per_expert_sublayer
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise BaseLayerConfigError(
            f"--base-experts {num_experts}: this worker's {num_experts // expert_parallel_size} experts would take "
            f"{needed / 2**30:.1f} GiB in float32 (more than this machine's {available / 2**30:.1f} GiB of memory); "
            f"use fewer experts per worker (--base-experts, or more workers with --base-expert-parallel-size)")


@register_model("transformer_lm_base", dataclass=TransformerLanguageModelBaseConfig)
class TransformerLanguageModelBase(TransformerLanguageModel):
    @classmethod
    def add_args(cls, parser):
        """fairseq's options from the config, with pre-LayerNorm's flags as transformer_lm's read:
        fairseq turns a bool option whose default is True into a store_false flag, so that
        --decoder-normalize-before (which transformer_lm users pass for pre-LayerNorm) turned it off."""
        super().add_args(parser)
        for action in getattr(parser, "_group_actions", parser._actions):  # a group (fairseq's) or a parser
            if "--decoder-normalize-before" in action.option_strings:
                action.const = True  # pre-LayerNorm, the default: a no-op kept for transformer_lm's command lines
        parser.add_argument("--no-decoder-normalize-before", dest="decoder_normalize_before", action="store_false",
                            help="post-LayerNorm (fairseq's transformer_lm default); not with --base-moe-freq")

    @classmethod
    def build_model(cls, args, task):
        if task.source_dictionary is None:  # fairseq's language_modeling task without data
            raise BaseLayerConfigError("no data directory: pass it as task.data=DIR to fairseq-hydra-train (as the first "
                                       "argument to fairseq-train)")
        layout = expert_layout(getattr(args, "base_expert_parallel_size", 0))
        num_experts = resolve_num_experts(args.base_experts, layout.expert_parallel_size)
        check_options(args, num_experts)

        check_expert_memory(args, num_experts, layout.expert_parallel_size)
        with _without_fairseq_base_layers(args):
            model = super().build_model(args, task)
        decoder = model.decoder
        trunk = list(decoder.layers)  # fewer than --decoder-layers with --decoder-layers-to-keep
        positions = base_layer_positions(len(trunk), args.base_layers, args.base_positions)

        dictionary = task.source_dictionary
        token_counts = list(dictionary.count)  # once, for every hash layer that balances by them

        def expert_layer(name, num_sublayers, dropout, score_norm=None):
            # A BASE layer's experts start as the identity (the paper); those of a feed-forward slot
            # as the block they replace would (fairseq's MoE layers, ParlAI's hash layers).
            config = BaseLayerConfig.from_model_options(args, num_sublayers=num_sublayers, dropout=dropout,
                                                        identity_start=score_norm is None)
            return BaseLayer(args.decoder_embed_dim, args.decoder_ffn_embed_dim, num_experts, config, layout=layout,
                             name=name, vocab_size=len(dictionary), score_norm=score_norm, token_counts=token_counts)

        layers, num_base, num_moe = [], 0, 0
        for after in range(len(trunk) + 1):
            if after in positions:
                num_base += 1
                layers.append(expert_layer(f"base{num_base}", args.base_sublayers, dropout=0.0))
            if after < len(trunk):
                layer = trunk[after]
                if args.base_moe_freq and (after + 1) % args.base_moe_freq == 0:
                    num_moe += 1
                    layer = ExpertFeedForwardLayer(layer, expert_layer(f"moe{num_moe}", 1, args.dropout,
                                                                       score_norm=layer.final_layer_norm))
                layers.append(layer)
        decoder.layers = nn.ModuleList(layers)
        decoder.num_layers = len(layers)
        # fairseq built the decoder; make it the subclass that prepares the expert layers.
        if type(decoder) is not TransformerDecoder:
            raise TypeError(f"transformer_lm_base expects fairseq's TransformerDecoder, got {type(decoder).__name__}")
        decoder.__class__ = TransformerDecoderWithExperts
        return model

    @classmethod
    def from_pretrained(cls, model_name_or_path, checkpoint_file="model.pt", data_name_or_path=".", **kwargs):
        """fairseq's (``FairseqModel.from_pretrained``), and in a process group of W workers each
        worker's own file of NAME-rank-*.pt, generating with the others (``fairseq_base/hub.py``)."""
        loaded = hub_utils.from_pretrained(model_name_or_path, own_checkpoint_file(model_name_or_path, checkpoint_file),
                                           data_name_or_path, archive_map=cls.hub_models(), **kwargs)
        return ExpertsHubInterface(loaded["args"], loaded["task"], loaded["models"])

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """fairseq's, and a dense transformer_lm's state dict (``--finetune-from-model DENSE.pt``)
        upcycled first: its trunk under the indices the expert layers leave it, its FFN blocks copied
        into the experts of the expert FFN slots (``fairseq_base/dense_to_experts.py``)."""
        if not state_has_experts(state_dict) and has_experts(self):
            state_dict = upcycle_state(state_dict, self)
            logger.info("upcycled a dense transformer_lm checkpoint: the expert layers start as the dense "
                        "model computes (fairseq_base/dense_to_experts.py)")
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


def real_rows(tokens: Tensor, pad: int) -> Optional[Tensor]:
    """The rows of the decoder's time-major hidden states [T * B, d] whose token ``tokens`` [B, T]
    is no padding; None where none is. Reads the device once (the rows' count), as fairseq's
    decoder does for its attention's padding mask."""
    real = tokens.ne(pad).t().reshape(-1).nonzero().squeeze(1)
    return None if real.numel() == tokens.numel() else real


class TransformerDecoderWithExperts(TransformerDecoder):
    """fairseq's decoder, which first tells its expert layers what they need to know about the
    input: hash layers the token ids, shuffling BASE layers every worker's token count (an
    exchange that runs in the background while the layers below them run).

    In ``extract_features``, which every path calls, training and generation alike (fairseq's
    SequenceGenerator calls ``decoder.forward`` directly, bypassing forward hooks)."""

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None, **kwargs):
        # As fairseq's decoder does: with an incremental state, only the last position is new.
        tokens = prev_output_tokens if incremental_state is None else prev_output_tokens[:, -1:]
        expert_layers = [m for m in self.modules() if isinstance(m, BaseLayer)]
        begin_forward(expert_layers)  # generating on several workers: a round with the others (lockstep.py)
        real = real_rows(tokens, self.padding_idx) if expert_layers else None
        for layer in expert_layers:
            layer.real_tokens = real
            if not layer.record.reads_scores:
                layer.token_ids = tokens
        shuffling = [layer for layer in expert_layers if layer.shuffle]
        if self.training and shuffling:
            routed = tokens.numel() if real is None else real.numel()
            exchange = SizeExchange(routed, tokens.device, shuffling[0].dispatcher.group)
            for layer in shuffling:
                layer.token_count_exchange = exchange
        return super().extract_features(prev_output_tokens, encoder_out=encoder_out,
                                        incremental_state=incremental_state, **kwargs)


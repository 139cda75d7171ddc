"""The BASE layer: score tokens against expert centroids, route, dispatch, run experts, combine.

Dimensions: T tokens on this worker (time x batch, flattened), E experts of the layer, W workers
of its expert-parallel group, P the expert-parallel size (workers that hold all E experts, E/P
each), C capacity (the (token, choice) pairs an expert takes), k choices per token, d the model
dimension.
"""

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fairseq_base.dispatcher import SizeExchange, TokenDispatcher, route_shuffled, sizes_of_every_worker
from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.experts import EXPERT_IDS, LocalExperts
from fairseq_base.groups import ExpertLayout, expert_layout
from fairseq_base.layer_checkpoints import adapt_layer_state
from fairseq_base.router import (EVAL_ROUTING, ROUTER, GATES, RouteContext, Routing, gate_one, hash_table,
                                 sigmoid_gated, update_expert_bias)
from fairseq_base.routing_stats import RoutingStatistics


@dataclass
class BaseLayerConfig:
    """How an expert layer routes and computes; ``from_model_options`` makes one from the model's
    options. transformer_lm_base's options default to these, except the balance loss's weight:
    the model's is Switch's 0.01 (with --criterion base_cross_entropy to take it), a bare layer's
    0, so that a layer built without that criterion makes no loss for nobody to take."""

    num_sublayers: int = 1  # residual FFN sublayers per expert
    activation_fn: str = "relu"
    router: str = "balanced"  # a name of router.ROUTER
    eval_routing: str = "greedy"  # BASE's family outside training: greedy or balanced
    shuffle: bool = True  # BASE's family on several workers: route each token on a random worker
    capacity_factor: float = 0.0  # routers that drop tokens; 0: the router's default (its paper's)
    balance_loss_weight: float = 0.0  # routers with a balance loss
    bias_update_rate: float = 1e-3  # lossfree: the bias step per optimizer step (DeepSeek-V3's)
    top2_second: str = "sampled"  # top2's second expert in training: sampled or greedy
    hash: str = "random"  # hash: random, or balanced by the token counts
    gate: str = "router"  # router: the router's own gate (as published); one: ``router.gate_one``
    dropout: float = 0.0  # on the gated update
    identity_start: bool = True  # experts start as the identity (a BASE layer); False: as an FFN block

    @classmethod
    def from_model_options(cls, args, **overrides) -> "BaseLayerConfig":
        """From transformer_lm_base's options (a Namespace or DictConfig); an option a checkpoint of
        an older version lacks takes its default."""
        defaults = cls()
        options = {"num_sublayers": "base_sublayers", "activation_fn": "activation_fn", "router": "base_router",
                   "eval_routing": "base_eval_routing", "shuffle": "base_shuffle",
                   "capacity_factor": "base_capacity_factor", "balance_loss_weight": "base_balance_loss",
                   "bias_update_rate": "base_bias_update_rate", "top2_second": "base_top2_second",
                   "hash": "base_hash", "gate": "base_gate"}
        values = {name: getattr(args, option, getattr(defaults, name)) for name, option in options.items()}
        values["shuffle"] = bool(values["shuffle"])
        return cls(**{**values, **overrides})


class BaseLayer(nn.Module):
    """A BASE layer (Lewis et al., 2021) over ``num_experts`` experts spread across the workers of
    an expert-parallel group (``layout``; default: all workers); with another router, the expert
    layer of the MoE baselines (``router.py``). Token t goes to expert a(t), the balanced
    assignment in training (``eval_routing`` otherwise), and leaves as

        h_t + sigmoid(h_t . w_a) * (expert_a(h_t) - h_t)     (w_e: expert e's centroid, as fairseq)

    Other routers choose and gate differently, and may drop a token over capacity. Called like a
    fairseq decoder layer: ``forward(x, ...)`` returns ``(x, None, None)``; hash needs the token ids
    of ``x`` in ``token_ids`` ([B, T], set by the model). ``config`` (or its fields as keywords)
    says how it routes. ``score_norm``: in a feed-forward slot, that block's LayerNorm, whose output
    the router scores (as fairseq's MoE gates, DeepSeek-V3 and torchtitan); a stand-alone BASE layer
    scores raw h, as fairseq's ``base_layer.py``. ``token_counts``: token id counts, for a balanced hash.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, num_experts: int, config: Optional[BaseLayerConfig] = None, *,
                 layout: Optional[ExpertLayout] = None, name: str = "base", vocab_size: int = 0,
                 score_norm: Optional[nn.Module] = None, token_counts: Optional[Sequence[int]] = None, **options):
        super().__init__()
        config = dataclasses.replace(config or BaseLayerConfig(), **options)
        for option, value, choices in (("--base-router", config.router, ROUTER), ("--base-gate", config.gate, GATES)):
            if value not in choices:
                raise BaseLayerConfigError(f"{option} must be one of {', '.join(choices)}; got {value!r}")
        self.config = config
        self.layout = layout or expert_layout()
        self.dispatcher = TokenDispatcher(num_experts, self.layout.expert_parallel_group)
        self.num_experts = num_experts
        self.router, self.record = config.router, ROUTER[config.router]
        self.eval_routing = config.eval_routing
        self.capacity_factor = config.capacity_factor or self.record.default_capacity
        self.balance_loss_weight = config.balance_loss_weight
        # Shuffling gives each worker's balanced assignment a sample of the whole batch; other
        # routers decide token by token, and one worker needs no shuffling.
        self.shuffle = config.shuffle and self.dispatcher.world_size > 1 and self.record.balanced_in_training
        # Every worker's token count, exchanged in the background: set by the model before each training forward.
        self.token_count_exchange: Optional[SizeExchange] = None
        self.real_tokens: Optional[Tensor] = None  # the rows that are no padding, set by the model (see forward)
        self.name = name
        if not self.record.reads_scores:
            self.register_buffer("hash_table", hash_table(config.hash, num_experts, vocab_size, token_counts))
            self.token_ids: Optional[Tensor] = None
        else:
            self.centroids = nn.Parameter(nn.init.orthogonal_(torch.empty(num_experts, embed_dim), gain=0.1))
        if self.record.has_bias:
            # The choice bias, saved with the model and the same on every worker.
            self.register_buffer("expert_bias", torch.zeros(num_experts))
            # Saved, so that a checkpoint says how its bias chooses (absent: on the raw score, as before).
            self.register_buffer("bias_on_affinity", torch.tensor(True))
            self.bias_update_rate = config.bias_update_rate
        local = self.dispatcher.num_local_experts
        first = self.layout.expert_parallel_rank * local
        # Drawn from the global generator, like every other initial weight, so that it follows
        # --seed; the experts are then built from it and their global ids alone.
        experts_seed = int(torch.randint(2**62, ()))
        self.experts = LocalExperts(range(first, first + local), embed_dim, ffn_dim, config.num_sublayers,
                                    config.activation_fn, experts_seed, config.identity_start)
        self.dropout = nn.Dropout(config.dropout)
        # The global ids of the local experts, saved with them so that a checkpoint knows them.
        self.register_buffer(EXPERT_IDS, torch.arange(first, first + local))
        # The weighted balance loss of the last forward, until the criterion takes it.
        self.balance_loss: Optional[Tensor] = None
        self.criterion_takes_balance_loss = False
        self.stats = RoutingStatistics(name, num_experts, self.layout)
        # Registered last: a checkpoint's entries (and the optimizer state that follows them) keep
        # the order they had before the router had it (the old layout's converters rely on that).
        self.score_norm = score_norm if self.record.reads_scores else None

    def forward(self, x: Tensor, *args, **kwargs):
        tokens = x.reshape(-1, x.size(-1))
        # Padding takes no expert: only the real rows are routed and mixed, padding rows pass as
        # they came (``real_tokens``: set by the model for this forward where its batch pads).
        rows, self.real_tokens = self.real_tokens, None
        routed = tokens if rows is None else tokens.index_select(0, rows)
        if self.shuffle and self.training:
            routing, recv_counts = self._route_shuffled(routed)
        else:
            routing, recv_counts = self._route_here(routed, rows), None
        mixed = self._mix(routed, routing, recv_counts)
        return (mixed if rows is None else tokens.index_copy(0, rows, mixed)).view_as(x), None, None

    def route(self, tokens: Tensor, rows: Optional[Tensor] = None):
        """(routing, scores) of ``tokens``, the rows ``rows`` of the layer's input (None: all); scores
        are None for a router that reads none (hash)."""
        context = self.route_context(rows)
        if not self.record.reads_scores:
            if context.token_ids is None or context.token_ids.numel() != tokens.size(0):
                raise RuntimeError(f"{self.name}: the {self.router} router needs the token ids of its "
                                   f"{tokens.size(0)} tokens in .token_ids (transformer_lm_base sets them)")
            return self._gated(self.record.route(None, context)), None
        scores = self._scores(tokens)
        outside_training = self.record.balanced_in_training and not self.training  # BASE's family: eval_routing
        routing = EVAL_ROUTING[self.eval_routing](scores) if outside_training else self.record.route(scores, context)
        return self._gated(routing), scores

    def route_context(self, rows: Optional[Tensor] = None) -> RouteContext:
        """What this layer's router needs beyond the scores, for the rows ``rows`` (None: all)."""
        context = RouteContext(self.training, self.capacity_factor,
                               sample_second=self.config.top2_second == "sampled")
        if self.record.has_bias:
            context.bias, context.bias_on_affinity = self.expert_bias, bool(self.bias_on_affinity)
        if not self.record.reads_scores and self.token_ids is not None:
            ids = self.token_ids.t().reshape(-1)  # hidden states are time-major [T, B, C]; token ids are [B, T]
            context.token_ids, context.hash_table = ids if rows is None else ids.index_select(0, rows), self.hash_table
        return context

    def _gated(self, routing: Routing) -> Routing:
        return gate_one(routing) if self.config.gate == "one" else routing

    def _scores(self, tokens: Tensor) -> Tensor:
        """[T, E] float32: each token's affinity h_t . w_e with each expert's centroid.

        In float32 whatever the model's dtype: in fp16 or bf16 the products would round
        (bf16 keeps 8 bits), and routing decisions would follow the rounding. Autocast
        (fairseq's --amp) would recast the product to fp16 despite the casts, so it is off here."""
        if self.score_norm is not None:
            tokens = self.score_norm(tokens)
        with torch.autocast(tokens.device.type, enabled=False):
            return tokens.float().matmul(self.centroids.float().t())

    def _route_here(self, tokens: Tensor, rows: Optional[Tensor]) -> Routing:
        routing, scores = self.route(tokens, rows)
        self._keep_balance_loss(routing.balance_loss)
        self.stats.count(routing, None if scores is None else scores.detach())
        return routing

    def _route_shuffled(self, tokens: Tensor):
        """(routing of our tokens, recv_counts for ``dispatch``): each token routed on a random
        worker (``dispatcher.route_shuffled``), gated here by its own score."""
        scores, group = self._scores(tokens), self.dispatcher.group
        exchange, self.token_count_exchange = self.token_count_exchange, None  # the model's, for this forward
        token_counts = sizes_of_every_worker(exchange, tokens.size(0), tokens.device, group)
        expert_ids, recv_counts, routing, sample = route_shuffled(
            scores, token_counts, lambda sample: self.record.route(sample, self.route_context()),
            self.dispatcher.num_local_experts, group)
        self.stats.count(routing, sample)
        return self._gated(sigmoid_gated(scores, expert_ids)), recv_counts

    def _mix(self, tokens: Tensor, routing: Routing, recv_counts: Optional[Tensor]) -> Tensor:
        choices = routing.expert_ids.size(1)
        expert_counts = None
        if routing.kept is None and choices == 1:  # every token to one expert: no gather
            source, rows, expert_ids, gates = None, tokens, routing.expert_ids[:, 0], routing.gates
            expert_counts = routing.expert_counts
        else:  # the (token, choice) pairs that found room
            pairs = routing.kept_mask().reshape(-1).nonzero().squeeze(1)
            source = torch.div(pairs, choices, rounding_mode="floor")
            rows, expert_ids = tokens.index_select(0, source), routing.expert_ids.reshape(-1)[pairs]
            gates = routing.gates.reshape(-1)[pairs][:, None]
        expert_in, tokens_per_expert, state = self.dispatcher.dispatch(rows, expert_ids, recv_counts, expert_counts)
        update = self.dispatcher.combine(self.experts(expert_in, tokens_per_expert), state)
        update = self.dropout(gates.to(tokens.dtype) * update)
        return tokens + update if source is None else tokens.index_add(0, source, update)

    def _keep_balance_loss(self, balance_loss: Optional[Tensor]) -> None:
        if balance_loss is None or self.balance_loss_weight == 0:
            return
        if self.training and self.balance_loss is not None and not self.criterion_takes_balance_loss:
            raise BaseLayerConfigError(
                f"--base-router {self.router} adds a balance loss that the criterion ignores; train with "
                f"--criterion base_cross_entropy (or --base-balance-loss 0)")
        self.balance_loss = self.balance_loss_weight * balance_loss

    def _apply(self, fn, *args, **kwargs):
        # lossfree's bias stays float32 under --fp16 and --bf16 (model.half() casts every buffer):
        # steps of 1e-3 vanish against a bias of 1 in bf16, whose spacing there is 2^-7.
        bias = self._buffers.get("expert_bias")
        super()._apply(fn, *args, **kwargs)
        if bias is not None:
            self._buffers["expert_bias"] = bias.to(self._buffers["expert_bias"].device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        adapt_layer_state(self, state_dict, prefix)  # the expert count, earlier versions, other workers' experts
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def reduce_routing_stats(model: nn.Module) -> None:
    """Once per optimizer step: the step's routing counts of every expert layer of ``model``, summed
    over the workers in one all-reduce for all layers together (as Megatron-core reduces its MoE
    metrics at log time, not in every forward). Each layer logs its statistics, and lossfree's bias
    moves toward the experts that received fewer tokens than the mean (no load, no change). Every
    worker reads the same sums, so the bias stays the same everywhere."""
    layers = [layer for layer in model.modules() if isinstance(layer, BaseLayer)]
    if not layers:
        return
    counts = torch.cat([layer.stats.step_counts for layer in layers])
    world = layers[0].layout  # every layer's layout spans the same workers (``groups.expert_layout``)
    if world.world_size > 1:
        dist.all_reduce(counts, group=world.world_group)
    for layer, summed in zip(layers, counts.split([layer.stats.step_counts.numel() for layer in layers])):
        layer.stats.step_counts.zero_()
        layer.stats.log(summed)
        if layer.record.has_bias:
            update_expert_bias(layer.expert_bias, summed[:layer.num_experts], layer.bias_update_rate)


def experts_by_layout(model: nn.Module):
    """[(layout, expert parameters of every expert layer of that layout)] of ``model``."""
    layers = {}
    for layer in model.modules():
        if isinstance(layer, BaseLayer):
            layers.setdefault(id(layer.layout), (layer.layout, []))[1].extend(layer.experts.parameters())
    return list(layers.values())


def reduce_expert_grads(model: nn.Module) -> None:
    """After the backward pass: sum every expert's gradient over its replicas and divide it by
    W (``ExpertLayout.reduce_expert_grads``), one all-reduce per layout."""
    for layout, params in experts_by_layout(model):
        layout.reduce_expert_grads(params)

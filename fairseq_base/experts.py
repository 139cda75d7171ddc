"""Expert networks: each expert is a stack of residual feed-forward sublayers, and a worker's
local experts are stacked weights that run as batched matrix products (one ``torch.baddbmm``
per projection for all of them, however many there are)."""

from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq import utils
from torch import Tensor, nn

# The parameters of a sublayer, in the order they are registered (and saved): each has a
# leading expert dimension. The projections are [in, out] (nn.Linear's transposed): the batched
# product and its gradients then need no transposed copy, which on CPU makes them faster.
SUBLAYER_PARAMETERS = ("norm_weight", "norm_bias", "ff1_weight", "ff1_bias", "ff2_weight", "ff2_bias")


class StackedSublayer(nn.Module):
    """One sublayer of E experts: for expert j, the branch W2 act(W1 LayerNorm(x)) of fairseq's
    BaseSublayer x + W2 act(W1 LayerNorm(x)), computed as act(LayerNorm(x) @ ff1_weight[j]) @
    ff2_weight[j] (ff1_weight [E, d, ffn], ff2_weight [E, ffn, d]).

    The last projection starts at zero (fairseq zeroes its weight; we zero its bias too), so
    a new expert is the identity and a new BASE layer leaves the trunk as is; ``LocalExperts``
    draws it as nn.Linear does where an expert takes a feed-forward block's place.
    """

    def __init__(self, num_experts: int, embed_dim: int, ffn_dim: int, activation_fn: str = "relu"):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(num_experts, embed_dim))
        self.norm_bias = nn.Parameter(torch.zeros(num_experts, embed_dim))
        self.ff1_weight = nn.Parameter(torch.empty(num_experts, embed_dim, ffn_dim))
        self.ff1_bias = nn.Parameter(torch.empty(num_experts, ffn_dim))
        self.ff2_weight = nn.Parameter(torch.zeros(num_experts, ffn_dim, embed_dim))
        self.ff2_bias = nn.Parameter(torch.zeros(num_experts, embed_dim))
        self.activation_fn = utils.get_activation_fn(activation_fn)

    def forward(self, x: Tensor, weights: Optional[List[Tensor]] = None) -> Tensor:
        """x: [E', C, d] for ``weights`` (``SUBLAYER_PARAMETERS``, each [E', ...]); by default the E
        experts' own. Returns the branches, [E', C, d]."""
        norm_weight, norm_bias, ff1_weight, ff1_bias, ff2_weight, ff2_bias = weights or self.stacked_weights()
        h = F.layer_norm(x, x.shape[-1:]) * norm_weight[:, None] + norm_bias[:, None]
        h = self.activation_fn(torch.baddbmm(ff1_bias[:, None], h, ff1_weight))
        return torch.baddbmm(ff2_bias[:, None], h, ff2_weight)

    def stacked_weights(self) -> List[Tensor]:
        return [getattr(self, name) for name in SUBLAYER_PARAMETERS]

    def each_experts_weights(self) -> List[List[Tensor]]:
        """[expert j's weights, each [1, ...]]: views whose backward is one stack per parameter
        (indexing each expert's slice would write a full-size gradient per expert)."""
        return [[w[None] for w in weights] for weights in zip(*(p.unbind(0) for p in self.stacked_weights()))]


def _projections(num_sublayers: int, embed_dim: int, ffn_dim: int):
    """One expert's initial (ff1, ff2) per sublayer, drawn as nn.Linear draws them (fairseq's
    fc1 and fc2). ff2 is drawn even where it starts at zero: an expert's ff1 then does not depend
    on how it starts, and is the same numbers as when each expert was a module of its own."""
    for _ in range(num_sublayers):
        yield nn.Linear(embed_dim, ffn_dim), nn.Linear(ffn_dim, embed_dim)


# The buffer in which an expert layer saves its local experts' global ids (``BaseLayer``).
EXPERT_IDS = "expert_ids"


def is_expert(param: Tensor) -> bool:
    """Whether ``param`` belongs to experts (tagged by ``LocalExperts``): never averaged across
    data-parallel workers, reduced over its replicas instead."""
    return hasattr(param, "expert")


def has_experts(model) -> bool:
    """A built model with expert parameters (BASE layers or expert FFNs, ours or fairseq's)."""
    return isinstance(model, nn.Module) and any(is_expert(param) for param in model.parameters())


class LocalExperts(nn.Module):
    """The experts held by this worker, ``len(global_ids)`` of them, as stacked weights: each is
    a stack of residual sublayers x <- x + sublayer(x), and returns its update expert(x) - x.

    Expert g starts from a generator seeded with ``seed + g``: its initial weights depend on
    the seed and its global id only, so that the experts of a model built for W workers are
    those of the one-process model, and no two experts start equal. ``identity_start``: the
    last projection starts at zero, so that the expert starts as the identity (a BASE layer,
    as the paper and fairseq's ``base_layer.py``); else as nn.Linear draws it, as the
    feed-forward block that the expert replaces would (fairseq's MoE layers and ParlAI's hash
    layers). Every parameter is tagged ``expert = True`` so that fairseq's legacy_ddp does not
    average it across data-parallel workers.
    """

    def __init__(self, global_ids: Iterable[int], embed_dim: int, ffn_dim: int, num_sublayers: int,
                 activation_fn: str = "relu", seed: int = 0, identity_start: bool = True):
        super().__init__()
        global_ids = list(global_ids)
        self.num_experts = len(global_ids)
        self.sublayers = nn.ModuleList(StackedSublayer(self.num_experts, embed_dim, ffn_dim, activation_fn)
                                       for _ in range(num_sublayers))
        with torch.no_grad():
            for j, global_id in enumerate(global_ids):
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(seed + global_id)
                    for sublayer, (ff1, ff2) in zip(self.sublayers, _projections(num_sublayers, embed_dim, ffn_dim)):
                        sublayer.ff1_weight[j], sublayer.ff1_bias[j] = ff1.weight.t(), ff1.bias
                        if not identity_start:
                            sublayer.ff2_weight[j], sublayer.ff2_bias[j] = ff2.weight.t(), ff2.bias
        for param in self.parameters():
            param.expert = True

    def forward(self, tokens: Tensor, tokens_per_expert: List[int]) -> Tensor:
        """tokens: [T, d], local expert j's ``tokens_per_expert[j]`` after expert j - 1's; returns
        each token's update, in the same order.

        The experts run together on [E, C, d], each padded to the busiest one's C tokens (BASE's
        balanced assignment gives them all floor or ceil of T / E: one padded row at most). Where
        padding would more than double the rows (a very uneven router), they run one by one."""
        batches, slots = expert_batches(tokens, tokens_per_expert)
        if batches is None:
            weights = list(zip(*(sublayer.each_experts_weights() for sublayer in self.sublayers)))
            return torch.cat([self._update(chunk[None], weights[j])[0]
                              for j, chunk in enumerate(tokens.split(tokens_per_expert))])
        update = self._update(batches, [None] * len(self.sublayers))
        return update.view(tokens.shape) if slots is None else update.flatten(0, 1).index_select(0, slots)

    def _update(self, x: Tensor, weights: List[Optional[List[Tensor]]]) -> Tensor:
        """The experts' update of x through every sublayer, with ``weights[s]`` for sublayer s.
        Summed from the branches rather than subtracted at the end, so that it keeps its
        precision in fp16 when it is small next to x."""
        update = None
        for sublayer, sublayer_weights in zip(self.sublayers, weights):
            branch = sublayer(x if update is None else x + update, sublayer_weights)
            update = branch if update is None else update + branch
        return update


def expert_batches(tokens: Tensor, tokens_per_expert: List[int]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(batches [E, C, d], slots): ``tokens`` grouped by expert and padded with zero rows to the
    busiest expert's C; ``slots`` [T], where each token sits in ``batches.flatten(0, 1)``, or None
    when no row is padded (a view then, no copy). (None, None) when padding would more than
    double the rows."""
    num_experts, busiest = len(tokens_per_expert), max(tokens_per_expert, default=0)
    if num_experts * busiest == tokens.size(0):
        return tokens.view(num_experts, busiest, tokens.size(1)), None
    if num_experts * busiest > 2 * tokens.size(0) + num_experts:
        return None, None
    # Built on the host from host counts, then copied: no synchronisation with the device.
    counts = torch.tensor(tokens_per_expert)
    starts = torch.cumsum(counts, 0) - counts
    shift = torch.arange(num_experts) * busiest - starts
    slots = (torch.arange(tokens.size(0)) + torch.repeat_interleave(shift, counts, output_size=tokens.size(0)))
    slots = slots.to(tokens.device, non_blocking=True)
    padded = tokens.new_zeros(num_experts * busiest, tokens.size(1)).index_copy(0, slots, tokens)
    return padded.view(num_experts, busiest, tokens.size(1)), slots

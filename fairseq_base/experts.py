"""Expert networks: each expert is a stack of residual feed-forward sublayers."""

from typing import Iterable, List

import torch
from fairseq import utils
from fairseq.modules import LayerNorm
from torch import Tensor, nn


class ExpertSublayer(nn.Module):
    """The branch W2 act(W1 LayerNorm(x)) of fairseq's BaseSublayer x + W2 act(W1 LayerNorm(x)).

    The last projection starts at zero (fairseq zeroes its weight; we zero its bias
    too), so a new expert is the identity and a new BASE layer leaves the trunk as is.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, activation_fn: str = "relu"):
        super().__init__()
        self.norm = LayerNorm(embed_dim)
        self.ff1 = nn.Linear(embed_dim, ffn_dim)
        self.ff2 = nn.Linear(ffn_dim, embed_dim)
        nn.init.zeros_(self.ff2.weight)
        nn.init.zeros_(self.ff2.bias)
        self.activation_fn = utils.get_activation_fn(activation_fn)

    def forward(self, x: Tensor) -> Tensor:
        return self.ff2(self.activation_fn(self.ff1(self.norm(x))))


class Expert(nn.Sequential):
    """Residual sublayers x <- x + sublayer(x); returns the update expert(x) - x.

    The update is summed from the branches rather than subtracted at the end, so that it
    keeps its precision in fp16 when it is small next to x.
    """

    def forward(self, x: Tensor) -> Tensor:
        sublayers = iter(self)
        update = next(sublayers)(x)
        for sublayer in sublayers:
            update = update + sublayer(x + update)
        return update


class LocalExperts(nn.ModuleList):
    """The experts held by this worker; ``self[j]`` maps local expert j's tokens to their updates.

    Expert g starts from a generator seeded with ``seed + g``: its initial weights depend on
    the seed and its global id only, so that the experts of a model built for W workers are
    those of the one-process model, and no two experts start equal. Every parameter is
    tagged ``expert = True`` so that fairseq's legacy_ddp does not average it across
    data-parallel workers.
    """

    def __init__(self, global_ids: Iterable[int], embed_dim: int, ffn_dim: int, num_sublayers: int,
                 activation_fn: str = "relu", seed: int = 0):
        experts = []
        for global_id in global_ids:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed + global_id)
                experts.append(Expert(*(ExpertSublayer(embed_dim, ffn_dim, activation_fn)
                                        for _ in range(num_sublayers))))
        super().__init__(experts)
        for param in self.parameters():
            param.expert = True

    def forward(self, tokens: Tensor, tokens_per_expert: List[int]) -> Tensor:
        if len(self) == 1:
            return self[0](tokens)
        # Empty chunks still run, so every expert parameter gets a (zero) gradient.
        chunks = tokens.split(tokens_per_expert)
        return torch.cat([expert(chunk) for expert, chunk in zip(self, chunks)])

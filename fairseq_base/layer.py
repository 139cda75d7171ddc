"""The BASE layer: score tokens against expert centroids, route, dispatch, run experts, combine."""

from typing import Optional

import torch
from fairseq import metrics
from torch import Tensor, nn

from fairseq_base.dispatcher import TokenDispatcher, all_gather_sizes, even_split, world_rank
from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.experts import LocalExperts
from fairseq_base.router import route, routing_stats


class BaseLayer(nn.Module):
    """A BASE layer (Lewis et al., 2021) over ``num_experts`` experts spread across the workers of ``group``.

    Token t with hidden state h_t goes to expert a(t): the balanced assignment during
    training, ``eval_routing`` otherwise. Its output is

        sigmoid(h_t . w_a) * expert_a(h_t) + (1 - sigmoid(h_t . w_a)) * h_t

    with w_e the learned centroid of expert e (fairseq's formulation). Called like a
    fairseq decoder layer: ``forward(x, ...)`` returns ``(x, None, None)``.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, num_experts: int, num_sublayers: int = 1,
                 activation_fn: str = "relu", eval_routing: str = "greedy", shuffle: bool = True,
                 group: Optional[object] = None, name: str = "base"):
        super().__init__()
        self.dispatcher = TokenDispatcher(num_experts, group)
        self.num_experts = num_experts
        self.eval_routing = eval_routing
        # Shuffling moves tokens between workers, so it only exists with more than one.
        multi_worker = self.dispatcher.world_size > 1
        self.shuffler = TokenDispatcher(self.dispatcher.world_size, group) if shuffle and multi_worker else None
        self.name = name
        self.centroids = nn.Parameter(nn.init.orthogonal_(torch.empty(num_experts, embed_dim), gain=0.1))
        local = self.dispatcher.num_local_experts
        first = world_rank(group) * local
        self.experts = LocalExperts(local, embed_dim, ffn_dim, num_sublayers, activation_fn)
        # The global ids of the local experts, saved with them so that a checkpoint knows them.
        self.register_buffer("expert_ids", torch.arange(first, first + local))

    def forward(self, x: Tensor, *args, **kwargs):
        tokens = x.reshape(-1, x.size(-1))
        if self.shuffler is not None and self.training:
            # Send every token to a random worker first, so that each worker's balanced
            # assignment sees a sample of the whole batch (as in the paper).
            group, workers = self.shuffler.group, self.shuffler.num_experts
            # split[w, v]: tokens that worker w sends to worker v (token i goes to perm[i] % W).
            split = even_split(all_gather_sizes(tokens.size(0), tokens.device, group), workers)
            destination = torch.randperm(tokens.size(0), device=tokens.device) % workers
            shuffled, _, shuffle_state = self.shuffler.dispatch(tokens, destination, split[:, world_rank(group)])
            # Balanced routing of each worker's shuffled tokens: when every worker's count divides
            # by E, each expert gets count / E tokens from each worker, and nobody needs to ask.
            received = split.sum(0)
            known = None
            if bool((received % self.num_experts == 0).all()):
                known = (received // self.num_experts)[:, None].expand(-1, self.dispatcher.num_local_experts)
            out = self.shuffler.combine(self._route_and_mix(shuffled, known), shuffle_state)
        else:
            out = self._route_and_mix(tokens)
        return out.view_as(x), None, None

    def _route_and_mix(self, tokens: Tensor, recv_counts: Optional[Tensor] = None) -> Tensor:
        scores = tokens.matmul(self.centroids.t())
        expert_ids = route(scores.detach(), "balanced" if self.training else self.eval_routing)
        gate = torch.sigmoid(scores.gather(1, expert_ids[:, None]))
        expert_in, tokens_per_expert, state = self.dispatcher.dispatch(tokens, expert_ids, recv_counts)
        expert_out = self.dispatcher.combine(self.experts(expert_in, tokens_per_expert), state)
        self._log_stats(scores.detach(), expert_ids)
        return torch.lerp(tokens, expert_out, gate.to(tokens.dtype))  # gate * expert_out + (1 - gate) * tokens

    def _log_stats(self, scores: Tensor, expert_ids: Tensor) -> None:
        for key, value in routing_stats(scores, expert_ids).items():
            metrics.log_scalar(f"{self.name}_{key}", value, weight=1, priority=250, round=3)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        saved = state_dict.get(prefix + "centroids")
        if saved is not None and saved.size(0) != self.num_experts:
            raise BaseLayerConfigError(
                f"{prefix.rstrip('.')}: the checkpoint has {saved.size(0)} experts but this model was built "
                f"with {self.num_experts}; pass --base-experts {saved.size(0)} (for fairseq-eval-lm: "
                f"--model-overrides \"{{'base_experts': {saved.size(0)}}}\")")
        saved_ids = state_dict.get(prefix + "expert_ids")
        if saved_ids is not None and not torch.equal(saved_ids.cpu(), self.expert_ids.cpu()):
            self._take_own_experts(state_dict, prefix, saved_ids.tolist())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _take_own_experts(self, state_dict, prefix: str, saved_ids) -> None:
        """Keep this worker's experts from a checkpoint that holds others too (e.g. one file for all)."""
        position = {global_id: j for j, global_id in enumerate(saved_ids)}
        mine = self.expert_ids.tolist()
        if any(global_id not in position for global_id in mine):
            raise BaseLayerConfigError(
                f"{prefix.rstrip('.')}: this checkpoint file holds experts {saved_ids} but this worker needs "
                f"experts {mine}; run fairseq-base-reshard CKPT --world-size {self.num_experts // len(mine)} "
                f"--out OUT.pt and load OUT.pt")
        expert_prefix = prefix + "experts."
        saved = {k: state_dict.pop(k) for k in list(state_dict) if k.startswith(expert_prefix)}
        for j, global_id in enumerate(mine):
            source = f"{expert_prefix}{position[global_id]}."
            for key, value in saved.items():
                if key.startswith(source):
                    state_dict[f"{expert_prefix}{j}.{key[len(source):]}"] = value
        state_dict[prefix + "expert_ids"] = self.expert_ids.clone()

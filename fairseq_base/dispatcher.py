"""Moves tokens to the workers that hold their experts and back, with all-to-all.

The dispatcher knows nothing about routing: it takes an expert id per token and
returns the tokens each local expert must process, grouped by expert. Experts
0..E-1 are laid out in blocks, worker w holding experts [w*E/W, (w+1)*E/W). With
one worker every all-to-all is the identity and no process group is needed.

Dimensions: T tokens on this worker, E experts, W workers of the group (the expert-parallel
group: P of the model's workers), L = E/W local experts per worker, d the model dimension.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from fairseq_base.router import Routing, count_per_expert


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def world_rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


class SizeExchange:
    """Every worker's ``size``, gathered in the background: start it as soon as the size is
    known and ``wait`` where it is needed, so that the exchange costs no synchronisation."""

    def __init__(self, size: int, device, group=None):
        self.size = size
        self._sizes = torch.zeros(world_size(group), dtype=torch.long, device=device)
        self._mine = torch.full((1,), size, dtype=torch.long, device=device)  # a fill, not a host copy
        self._work = dist.all_gather_into_tensor(self._sizes, self._mine, group=group, async_op=True)

    def wait(self) -> Tensor:
        """The sizes, as a LongTensor [W]."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._sizes


def sizes_of_every_worker(exchange: Optional[SizeExchange], size: int, device, group=None) -> Tensor:
    """Every worker's ``size`` [W]: from ``exchange``, started earlier for this size, or exchanged now."""
    if exchange is None:
        exchange = SizeExchange(size, device, group)
    elif exchange.size != size:
        raise RuntimeError(f"the model announced {exchange.size} tokens, the expert layer got {size}")
    return exchange.wait()


def even_split(sizes: Tensor, parts: int) -> Tensor:
    """[W, parts]: each worker's tokens dealt out evenly to ``parts`` parts, the first parts taking the remainder."""
    base = (sizes // parts)[:, None].expand(-1, parts)
    return base + (torch.arange(parts, device=sizes.device)[None, :] < (sizes % parts)[:, None]).long()


def shuffle_replies(chosen: Tensor, received: List[int], received_counts: Tensor, local: int) -> Tensor:
    """A router's replies after the shuffle of BASE routing (``route_shuffled``).

    The router received ``received[w]`` tokens from worker w (``received_counts``: the same as a
    LongTensor [W], on the device), in worker order, and chose global expert ``chosen[i]`` ([sum
    received]) for each. Worker w's reply: the experts of its tokens, then [W * L] counts, how
    many tokens of each worker v this router sends to w's local expert j (at v * L + j), so that
    w learns what it will receive without another exchange. Returns the replies concatenated
    (worker w's is ``received[w] + W * L`` long)."""
    workers = len(received)
    num_experts = workers * local
    source = torch.repeat_interleave(torch.arange(workers, device=chosen.device), received_counts,
                                     output_size=len(chosen))
    counts = count_per_expert(source * num_experts + chosen, workers * num_experts)  # [v, w, j]
    counts = counts.view(workers, workers, local).transpose(0, 1).reshape(workers, workers * local)  # [w, v * L + j]
    return torch.cat([part for ids, count in zip(chosen.split(received), counts) for part in (ids, count)])


def read_replies(replies: Tensor, sent: List[int], local: int) -> Tuple[Tensor, Tensor]:
    """What a worker learns from the routers' ``shuffle_replies`` (router r's first, ``sent[r]``
    tokens each): the experts of its tokens in the order it sent them, and recv_counts [W, L],
    the tokens each worker will send to each of its local experts."""
    workers = len(sent)
    parts = replies.split([size for n in sent for size in (n, workers * local)])
    return torch.cat(parts[0::2]), torch.stack(parts[1::2]).view(workers, workers, local).sum(0)


def route_shuffled(scores: Tensor, token_counts: Tensor, route: Callable[[Tensor], Routing], local: int,
                   group=None) -> Tuple[Tensor, Tensor, Routing, Tensor]:
    """BASE routing in which every worker's router sees a random sample of the whole batch (as in
    the paper): each worker sends its tokens' ``scores`` [T, E] to random workers, whose routers
    (``route``) send back the experts. Tokens then travel once, straight to their experts.
    ``token_counts`` [W]: every worker's T; ``local``: experts per worker.

    Returns (the experts of our tokens [T], recv_counts [W, L] for ``TokenDispatcher.dispatch``,
    this worker's router's routing and the sample [sum received, E] it routed). Each router's
    reply to worker u also says how many tokens of each worker it sent to u's experts, so that u
    learns what it will receive without another exchange. With one worker: a routing of the
    tokens in a random order, mapped back."""
    workers, rank = world_size(group), world_rank(group)
    split = even_split(token_counts, workers)  # split[w, v]: w's tokens for v's router
    sent, received = torch.stack([split[rank], split[:, rank]]).tolist()  # one synchronisation
    order = torch.randperm(scores.size(0), device=scores.device)
    sample = all_to_all(scores.detach().index_select(0, order), received, sent, group)
    routing = route(sample)
    reply = shuffle_replies(routing.expert_ids[:, 0], received, split[:, rank], local)
    per_router = workers * local
    reply = all_to_all(reply, [n + per_router for n in sent], [n + per_router for n in received], group)
    chosen, recv_counts = read_replies(reply, sent, local)
    expert_ids = torch.empty_like(order)
    expert_ids[order] = chosen
    return expert_ids, recv_counts, routing, sample


def invert_permutation(perm: Tensor) -> Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward sends gradients back along the same splits."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (input_splits, output_splits), group
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, *ctx.splits, ctx.group), None, None, None


def all_to_all(x: Tensor, output_splits: List[int], input_splits: List[int], group=None) -> Tensor:
    """Row blocks of ``x`` of sizes ``input_splits`` go to workers 0..W-1; returns what arrives."""
    if world_size(group) == 1:
        return x
    return _AllToAll.apply(x, output_splits, input_splits, group)


@dataclass
class DispatchState:
    """What ``combine`` needs to undo a ``dispatch``."""

    send_order: Tensor  # sorts local tokens by expert id
    recv_order: Optional[Tensor]  # sorts received tokens by local expert (None: already sorted)
    send_splits: List[int]
    recv_splits: List[int]


class TokenDispatcher:
    def __init__(self, num_experts: int, group: Optional[object] = None):
        self.group = group
        self.world_size = world_size(group)
        if num_experts < 1 or num_experts % self.world_size != 0:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {self.world_size} workers")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.world_size

    def dispatch(self, tokens: Tensor, expert_ids: Tensor, recv_counts: Optional[Tensor] = None,
                 expert_counts: Optional[List[int]] = None):
        """Returns (expert_inputs grouped by local expert, tokens per local expert, state).

        ``recv_counts[w, j]``, the number of tokens worker w sends to our local expert j, is
        exchanged with the other workers unless the caller already knows it. The sizes the
        all-to-alls and the experts need are read from the device in one host synchronisation;
        in one process none, where the router knows ``expert_counts`` (tokens per expert) itself.
        """
        send_order = torch.argsort(expert_ids, stable=True)
        workers, local = self.world_size, self.num_local_experts
        if workers == 1:
            if expert_counts is None:
                expert_counts = count_per_expert(expert_ids, self.num_experts).tolist()
            state = DispatchState(send_order, None, [expert_ids.numel()], [expert_ids.numel()])
            return tokens.index_select(0, send_order), expert_counts, state
        send_counts = count_per_expert(expert_ids, self.num_experts)
        if recv_counts is None:
            recv_counts = all_to_all(send_counts, [local] * workers, [local] * workers, self.group)
        sizes = torch.cat([send_counts, recv_counts.reshape(-1)]).tolist()  # the one synchronisation
        send_splits = [sum(sizes[w * local:(w + 1) * local]) for w in range(workers)]
        received_by_source = [sizes[self.num_experts + w * local:self.num_experts + (w + 1) * local]
                              for w in range(workers)]
        recv_splits = [sum(row) for row in received_by_source]
        tokens_per_expert = [sum(column) for column in zip(*received_by_source)]
        # index_select rather than tokens[order]: on CPU about twice as fast, backward included.
        received = all_to_all(tokens.index_select(0, send_order), recv_splits, send_splits, self.group)
        if local == 1:  # one expert: rows already arrive grouped by expert
            return received, tokens_per_expert, DispatchState(send_order, None, send_splits, recv_splits)
        # Rows arrive grouped by source worker, then expert; regroup them by expert.
        local_ids = torch.arange(local, device=tokens.device).repeat(workers)
        recv_order = torch.argsort(torch.repeat_interleave(local_ids, recv_counts.reshape(-1),
                                                           output_size=sum(recv_splits)), stable=True)
        state = DispatchState(send_order, recv_order, send_splits, recv_splits)
        return received.index_select(0, recv_order), tokens_per_expert, state

    def combine(self, expert_outputs: Tensor, state: DispatchState) -> Tensor:
        """Inverse of ``dispatch``: the outputs in the original token order on the original worker."""
        by_source = expert_outputs
        if state.recv_order is not None:
            by_source = expert_outputs.index_select(0, invert_permutation(state.recv_order))
        returned = all_to_all(by_source, state.send_splits, state.recv_splits, self.group)
        return returned.index_select(0, invert_permutation(state.send_order))

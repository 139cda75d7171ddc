"""Who talks to whom: the process groups of expert parallelism, built and named in one place.

The W workers form W/P expert-parallel groups of P consecutive workers. Each group holds all
E experts, E/P per worker, and routes, shuffles and exchanges its tokens inside itself:
worker r holds the experts of expert-parallel rank r % P. The W/P workers with the same
expert-parallel rank hold the same experts (replicas); they form an expert-data-parallel
group, over which those experts' gradients are summed. The shared parameters are averaged
over all W workers by fairseq's DDP, as in any model.

P = W (the default) is the paper's layout: one group, no replicas. P = 1 is plain data
parallelism: every worker holds every expert and no token travels.
"""

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.distributed as dist
from fairseq.distributed import utils as distributed_utils

from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.experts import is_expert

_LAYOUTS: Dict[Tuple[int, int], "ExpertLayout"] = {}


@dataclass(frozen=True)
class ExpertLayout:
    world_size: int
    expert_parallel_size: int
    rank: int = 0
    world_group: Optional[object] = None  # all W workers (fairseq's data-parallel group); None: one process
    expert_parallel_group: Optional[object] = None  # None: one process
    replica_group: Optional[object] = None  # None: no replicas

    @property
    def expert_parallel_rank(self) -> int:
        return self.rank % self.expert_parallel_size

    @property
    def replicas(self) -> int:
        return self.world_size // self.expert_parallel_size

    def reduce_expert_grads(self, params: Iterable[torch.Tensor]) -> None:
        """Divide each expert's gradient by W, as DDP divides the shared ones, and sum it over its
        replicas. An expert's gradient already sums over the tokens of its expert-parallel group
        (they reach it by all-to-all), so the result is the all-worker sum over W, the scale
        fairseq's trainer expects before it multiplies every gradient by W / sample size.
        Dividing first, as DDP does, keeps a loss-scaled fp16 sum of W/P replicas from
        overflowing sooner than the shared gradients' average."""
        grads = [p.grad for p in params if is_expert(p) and p.grad is not None]
        if not grads or self.world_size == 1:
            return
        if self.replicas == 1:
            torch._foreach_div_(grads, float(self.world_size))
            return
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.world_size)  # one all-reduce for all of them
        dist.all_reduce(flat, group=self.replica_group)
        torch._foreach_copy_(grads, [reduced.view_as(g) for g, reduced in zip(grads, flat.split([g.numel() for g in grads]))])


def resolve_expert_parallel_size(requested: int, world_size: int) -> int:
    if requested < 0:
        raise BaseLayerConfigError(
            f"--base-expert-parallel-size must be >= 0 (0: all {world_size} workers), got {requested}")
    size = requested or world_size
    if world_size % size != 0:
        raise BaseLayerConfigError(
            f"--base-expert-parallel-size {size} does not divide the {world_size} worker(s); use a divisor of "
            f"{world_size} (0: all of them), or for a checkpoint of {size} files run on a multiple of {size} "
            f"workers or rewrite it with fairseq-base-reshard --expert-parallel-size")
    return size


def resolve_num_experts(base_experts: int, workers: int) -> int:
    """E for ``workers`` (P) workers in each expert-parallel group."""
    if base_experts < 0:
        raise BaseLayerConfigError(f"--base-experts must be >= 0 (0: one per worker), got {base_experts}")
    num_experts = base_experts or workers
    if num_experts % workers != 0:
        raise BaseLayerConfigError(
            f"--base-experts {num_experts} cannot be split over the {workers} workers of an expert-parallel group; "
            f"use a multiple of {workers} (or 0 for one expert per worker), or a --base-expert-parallel-size "
            f"that divides {num_experts}")
    return num_experts


def expert_layout(expert_parallel_size: int = 0) -> ExpertLayout:
    """The layout of this process's world for P = ``expert_parallel_size`` (0: every worker).

    Its groups are built once per P (``dist.new_group`` is a collective: every worker builds
    every group, in the same order) and shared by every layer and model of the process."""
    if not (dist.is_available() and dist.is_initialized()):
        return ExpertLayout(1, resolve_expert_parallel_size(expert_parallel_size, 1))
    world = distributed_utils.get_data_parallel_group()
    world_size, rank = dist.get_world_size(world), dist.get_rank(world)
    size = resolve_expert_parallel_size(expert_parallel_size, world_size)
    key = (world_size, size)
    if key not in _LAYOUTS:
        if size == world_size:
            ep_group, replica_group = world, None
        else:
            ep_group = replica_group = None
            for first in range(0, world_size, size):
                group = dist.new_group(list(range(first, first + size)))
                if first <= rank < first + size:
                    ep_group = group
            for ep_rank in range(size):
                group = dist.new_group(list(range(ep_rank, world_size, size)))
                if rank % size == ep_rank:
                    replica_group = group
        _LAYOUTS[key] = ExpertLayout(world_size, size, rank, world, ep_group, replica_group)
    return _LAYOUTS[key]


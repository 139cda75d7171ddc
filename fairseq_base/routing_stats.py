"""An expert layer's routing statistics: loads, top-1 share, entropy, drops and churn.

In training each forward adds its counts to the step's (no collective); they are summed over the
workers once per optimizer step (``layer.reduce_routing_stats``), as Megatron-core reduces its
MoE metrics at log time. Outside training there is no step: a batch's counts are summed and
logged at once. Churn compares the first-choice experts of each validation's probe batch with
the previous probe's.
"""

from typing import Optional

import torch
import torch.distributed as dist
from fairseq import metrics
from torch import Tensor, nn

from fairseq_base.groups import ExpertLayout
from fairseq_base.router import COUNTED, Routing, routing_counts, stats_from_counts


class RoutingStatistics(nn.Module):
    """The statistics of the expert layer ``name``, logged as ``{name}_{statistic}``."""

    def __init__(self, name: str, num_experts: int, layout: ExpertLayout):
        super().__init__()
        self.name, self.num_experts, self.layout = name, num_experts, layout
        # This worker's ``routing_counts`` of the training forwards since the last optimizer step.
        self.register_buffer("step_counts", torch.zeros(num_experts + len(COUNTED)), persistent=False)
        # Routing churn: the first batch after ``probe_next_batch`` is set (at every validation) is
        # the probe; its first-choice experts are compared with those of the previous probe.
        self.probe_next_batch = False
        self.probe_expert_ids: Optional[Tensor] = None

    def count(self, routing: Routing, scores: Optional[Tensor]) -> None:
        """In training, add this forward's counts to the step's. Outside training, sum the batch's
        over the workers now (every worker routes in every forward, so all of them take part) and
        log them, with the churn if this is the probe batch."""
        counts = routing_counts(routing, scores, self.num_experts)
        if self.training:
            self.step_counts += counts
            return
        if self.layout.world_size > 1:
            dist.all_reduce(counts, group=self.layout.world_group)
        self.log(counts)
        if self.probe_next_batch:
            self.probe_next_batch = False
            self.log_churn(routing.expert_ids[:, 0])

    def log(self, counts: Tensor) -> None:
        """Log the statistics of ``counts``, the ``routing_counts`` of every worker, summed."""
        for key, value in stats_from_counts(counts, self.num_experts).items():
            metrics.log_scalar(f"{self.name}_{key}", value, weight=1, priority=250, round=3)

    def log_churn(self, expert_ids: Tensor) -> None:
        """Log ``churn``, the share of the probe's tokens whose first-choice expert changed since the
        previous probe, over all workers (each worker's probe is its first validation batch)."""
        previous, self.probe_expert_ids = self.probe_expert_ids, expert_ids.detach().clone()
        comparable = previous is not None and previous.shape == expert_ids.shape
        counts = torch.zeros(2, device=expert_ids.device)
        if comparable:
            counts[0], counts[1] = (previous != expert_ids).sum(), expert_ids.numel()
        if self.layout.world_size > 1:  # every worker probes at the same validation
            dist.all_reduce(counts, group=self.layout.world_group)
        if previous is not None:
            metrics.log_scalar(f"{self.name}_churn", counts[0] / counts[1].clamp_min(1), weight=1, priority=250,
                               round=3)

    def _apply(self, fn, *args, **kwargs):
        # The step's counts stay float32 under --fp16 and --bf16 (model.half() casts every buffer):
        # fp16 holds whole numbers exactly only up to 2048.
        counts = self.step_counts
        super()._apply(fn, *args, **kwargs)
        self.step_counts = counts.to(self.step_counts.device)
        return self

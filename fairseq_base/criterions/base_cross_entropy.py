"""``base_cross_entropy``: cross-entropy plus the balance loss of the switch and top2 routers."""

from typing import Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig
from fairseq.logging import metrics
from torch import Tensor, nn

from fairseq_base.layer import BaseLayer


def take_balance_loss(model: nn.Module) -> Optional[Tensor]:
    """The mean of the expert layers' weighted balance losses from their last forward (fairseq's
    MoE criterion averages its gates' losses over the layers); None if none."""
    losses = []
    for layer in model.modules():
        if isinstance(layer, BaseLayer) and layer.balance_loss is not None:
            losses.append(layer.balance_loss)
            layer.balance_loss = None
            layer.criterion_takes_balance_loss = True
    return torch.stack(losses).mean() if losses else None


@register_criterion("base_cross_entropy", dataclass=CrossEntropyCriterionConfig)
class BaseCrossEntropyCriterion(CrossEntropyCriterion):
    """fairseq's cross_entropy, plus sample_size x the balance loss, so that after fairseq
    divides by sample_size the objective is the mean cross-entropy + alpha * balance loss.

    ``loss`` (and the perplexity) in the logs stay the cross-entropy alone, comparable with
    any other model; ``balance_loss`` is logged beside it (weighted, the mean over layers).
    """

    def forward(self, model, sample, reduce=True):
        loss, sample_size, logging_output = super().forward(model, sample, reduce)
        balance_loss = take_balance_loss(model)
        if balance_loss is not None:
            loss = loss + balance_loss * sample_size
            logging_output["balance_loss"] = balance_loss.data * sample_size
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        CrossEntropyCriterion.reduce_metrics(logging_outputs)
        if any("balance_loss" in log for log in logging_outputs):
            sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
            total = sum(log.get("balance_loss", 0) for log in logging_outputs)
            metrics.log_scalar("balance_loss", total / max(sample_size, 1), sample_size, round=4)

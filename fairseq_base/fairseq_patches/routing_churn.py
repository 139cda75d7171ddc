"""Routing churn: the probe batch of every validation.

Replaces: ``Trainer.begin_valid_epoch``, to mark each expert layer's next batch as its probe
(``RoutingStatistics.probe_next_batch``), so that the layers log the share of probe tokens whose
expert changed since the last validation (``baseN_churn``).
Touches: models with BASE layers or expert FFNs of this plugin, on every launch path; a model
without them has no layer to mark, and fairseq's method runs as before.
"""

from fairseq.trainer import Trainer

from fairseq_base.layer import BaseLayer

FAIRSEQ_BEGIN_VALID_EPOCH = Trainer.begin_valid_epoch


def begin_valid_epoch(self, epoch):
    for layer in self.get_model().modules():
        if isinstance(layer, BaseLayer):
            layer.stats.probe_next_batch = True
    return FAIRSEQ_BEGIN_VALID_EPOCH(self, epoch)


def install() -> None:
    Trainer.begin_valid_epoch = begin_valid_epoch

"""Generation on W workers, each holding only its experts: every worker takes part in every
forward of every other worker, since tokens reach their experts by all-to-all.

While a model serves (``serving``), each forward of its decoder begins with a round: one
all-reduce of (forwards, failures) over all workers. A worker that generates enters it with a
forward; a worker with nothing (left) to generate ``serve``s: it enters every round with
none, and where another worker forwards, runs its expert layers on no tokens, so that their
all-to-alls complete, until a round in which nobody forwards. A worker that fails enters the
next round with its failure, and every worker stops with that line. Workers may thus hold
different prompts, of different lengths and numbers, and one worker may hold them all (the
command-line tools: worker 0 reads and prints, the others serve).
"""

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.layer import BaseLayer


class WorkerFailed(BaseLayerConfigError):
    pass


def expert_layers(model: nn.Module) -> List[BaseLayer]:
    return [module for module in model.modules() if isinstance(module, BaseLayer)]


def across_workers(layers: List[BaseLayer]) -> bool:
    return bool(layers) and layers[0].layout.world_size > 1


def _round(layers: List[BaseLayer], forwards: int, failure: Optional[str] = None) -> int:
    """One round: the number of workers that forward in it; raises every worker's ``WorkerFailed``
    where one of them failed."""
    world = layers[0].layout
    device = layers[0].expert_ids.device
    totals = torch.tensor([forwards, failure is not None], dtype=torch.long, device=device)
    dist.all_reduce(totals, group=world.world_group)
    if totals[1].item():
        failures = [None] * world.world_size
        dist.all_gather_object(failures, failure, group=world.world_group)
        raise WorkerFailed(next(f for f in failures if f is not None))
    return int(totals[0].item())


def begin_forward(layers: List[BaseLayer]) -> None:
    """Called by the decoder before each forward of its expert ``layers``: while they serve, this
    worker forwards in the next round."""
    if layers and getattr(layers[0], "serving", False) and across_workers(layers):
        _round(layers, 1)


def _forward_nothing(layers: List[BaseLayer]) -> None:
    """Every expert layer on no tokens, in the order a forward runs them: their collectives only."""
    for layer in layers:
        dim = layer.experts.sublayers[0].norm_weight.size(1)
        device, dtype = layer.expert_ids.device, layer.experts.sublayers[0].norm_weight.dtype
        if not layer.record.reads_scores:
            layer.token_ids = torch.zeros(1, 0, dtype=torch.long, device=device)
        layer(torch.zeros(0, 1, dim, device=device, dtype=dtype))


def serve(layers: List[BaseLayer], failure: Optional[str] = None) -> None:
    """Take part in the other workers' forwards, with none of this worker's, until none is left;
    ``failure``: this worker stopped with that line, which every worker then raises."""
    for layer in layers:  # as the others' generating models: outside training
        layer.eval()
    with torch.no_grad():
        while _round(layers, 0, failure):
            _forward_nothing(layers)


class Together:
    """``with Together(models):`` generate with ``models``, together with the other workers (each in
    a block of its own); ``add`` takes models loaded inside the block. On leaving it this worker
    serves the others until all are done; an exception in it stops every worker with its line."""

    def __init__(self, models: Optional[List[nn.Module]] = None):
        self.layers = []
        self.add(models or [])

    def add(self, models: List[nn.Module]) -> None:
        layers = [expert_layers(model) for model in models]
        if sum(across_workers(found) for found in layers + [self.layers]) > 1:
            raise BaseLayerConfigError("generation on several workers takes one model with experts; pass one --path")
        for found in layers:
            if across_workers(found):
                self.layers = found
                for layer in found:
                    layer.serving = True

    def __enter__(self):
        return self

    def __exit__(self, kind, err, trace):
        for layer in self.layers:
            layer.serving = False
        if not self.layers:
            return False
        if err is None:
            serve(self.layers)
        elif not isinstance(err, WorkerFailed):
            serve(self.layers, failure=f"{kind.__name__}: {err}".splitlines()[0])
        return False

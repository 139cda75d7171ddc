"""Host synchronisations of a BASE-layer training step (forward and backward), counted on CPU
(``host_syncs.py``): on a GPU each one stalls the device's queue until the host has read it.

BASE's exact balance lets most sizes be known without looking: in one process the solver's
copy of the scores to the host is the only one; on W workers with shuffling each worker reads
the token counts, copies its scores to the host, and reads the all-to-all sizes once. The
other routers read the tokens per expert (and, with capacity, which pairs were kept).
"""

import pytest
import torch
from fairseq import metrics

from distributed_utils import run_workers
from host_syncs import HostSyncs, host_result

from fairseq_base import assignment
from fairseq_base.assignment import sinkhorn_assignment
from fairseq_base.groups import expert_layout
from fairseq_base.layer import BaseLayer, reduce_routing_stats
from fairseq_base.models.transformer_lm_base import real_rows

LIMITS = {"balanced": 1, "switch": 2, "top2": 2, "hash": 2}
DIM, TOKENS, BATCH, VOCAB = 16, 24, 4, 50


class HostKernel:
    """The compiled solver, whose result lives in host memory."""

    def __init__(self, kernel):
        self.kernel = kernel

    def auction_assignment(self, *args):
        return host_result(self.kernel.auction_assignment(*args))


def use_host_kernel():
    kernel = assignment._cpu_kernel()
    assert kernel is not None
    assignment._cpu_kernel = lambda: HostKernel(kernel)


def step_syncs(layer, seed):
    """Host synchronisations of one training step of ``layer`` (after one uncounted step), its
    optimizer step's routing statistics included."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, BATCH, DIM, generator=generator, requires_grad=True)
    layer.token_ids = torch.randint(VOCAB, (BATCH, TOKENS), generator=generator)
    layer.criterion_takes_balance_loss = True
    logged = []
    with metrics.aggregate(new_root=True) as meters:
        layer(x)[0].sum().backward()
        reduce_routing_stats(layer)
        layer.token_ids = torch.randint(VOCAB, (BATCH, TOKENS), generator=generator)
        with HostSyncs() as syncs:
            layer(x)[0].sum().backward()
            reduce_routing_stats(layer)
        logged = [meter.val for meter in meters.values() if hasattr(meter, "val")]
    return syncs.where, logged


def layer_for(router, layout=None):
    torch.manual_seed(0)
    return BaseLayer(DIM, 2 * DIM, num_experts=4, router=router, vocab_size=VOCAB, layout=layout).train()


@pytest.mark.parametrize("router", LIMITS)
def test_one_process(router, monkeypatch):
    monkeypatch.setattr(assignment, "_KERNEL", dict(assignment._KERNEL))
    kernel = assignment._cpu_kernel()
    monkeypatch.setattr(assignment, "_cpu_kernel", lambda: HostKernel(kernel))
    where, logged = step_syncs(layer_for(router), seed=1)
    assert len(where) <= LIMITS[router], where
    # The routing statistics stay on the device until fairseq logs them.
    assert logged and all(isinstance(value, torch.Tensor) for value in logged)


def _shuffled_worker(rank, world_size):
    use_host_kernel()
    layer = layer_for("balanced", expert_layout())
    assert layer.shuffle
    return step_syncs(layer, seed=rank)[0]


def test_two_workers_with_shuffling():
    for where in run_workers(_shuffled_worker, 2):
        assert len(where) <= 3, where


def test_sinkhorn_reads_its_error_every_tenth_iteration():
    scores = 30 * torch.randn(64, 4, generator=torch.Generator().manual_seed(2))  # sharp: does not converge
    with HostSyncs() as syncs:
        sinkhorn_assignment(scores, tolerance=1e-12, max_iterations=100)
    assert syncs.count == 10, syncs.where


def test_the_rows_that_are_no_padding_cost_one_read_whether_the_batch_pads_or_not():
    pad = 1
    for tokens, expected in ((torch.tensor([[4, 5], [6, 7]]), None),
                             (torch.tensor([[4, 5], [6, pad]]), [0, 1, 2])):  # time-major rows: (t, b)
        with HostSyncs() as syncs:
            real = real_rows(tokens, pad)
        assert len(syncs.where) == 1, syncs.where
        assert (real is None) if expected is None else real.tolist() == expected

"""Expert parallelism with real gloo process groups (one process per worker)."""

import queue

import pytest
import torch
from fairseq import metrics
from torch import nn

from distributed_utils import run_workers
from fairseq_base.assignment import balanced_assignment
from fairseq_base.dispatcher import TokenDispatcher
from fairseq_base.groups import expert_layout
from fairseq_base.layer import BaseLayer, reduce_expert_grads, reduce_routing_stats
from fairseq_base.router import stats_from_counts
from expert_weights import ScaledExperts, expert_grads, expert_weights, set_expert_weights


def _dispatch_worker(rank, world_size, tokens_per_worker, experts_per_worker):
    num_experts = world_size * experts_per_worker
    dispatcher = TokenDispatcher(num_experts)
    gen = torch.Generator().manual_seed(rank)
    n = tokens_per_worker[rank]
    tokens = torch.randn(n, 3, generator=gen, requires_grad=True)
    # Routing-independent assignment that never uses the experts of the last worker.
    expert_ids = torch.randint(0, num_experts - experts_per_worker, (n,), generator=gen)
    expert_in, per_expert, state = dispatcher.dispatch(tokens, expert_ids)
    first = rank * experts_per_worker
    factors = torch.repeat_interleave(torch.arange(first, first + experts_per_worker).float() + 2,
                                      torch.tensor(per_expert, dtype=torch.long))
    out = dispatcher.combine(expert_in * factors[:, None], state)
    out.sum().backward()
    expected = (expert_ids + 2).float()[:, None]
    return (torch.allclose(out, tokens.detach() * expected), torch.allclose(tokens.grad, expected.expand(-1, 3)),
            sum(per_expert))


@pytest.mark.parametrize("world_size,tokens,local", [(2, [5, 0], 1), pytest.param(4, [7, 0, 3, 9], 2, marks=pytest.mark.slow)])
def test_dispatch_returns_each_token_from_the_right_expert(world_size, tokens, local):
    results = run_workers(_dispatch_worker, world_size, tokens, local)
    assert all(ok_out and ok_grad for ok_out, ok_grad, _ in results)
    assert results[-1][2] == 0  # the last worker's experts received no tokens
    assert sum(r[2] for r in results) == sum(tokens)


def _reference_layer(num_experts, dim, ffn, seed):
    torch.manual_seed(seed)
    layer = BaseLayer(dim, ffn, num_experts, num_sublayers=2, eval_routing="greedy")
    for p in layer.experts.parameters():  # start away from the identity
        nn.init.normal_(p, std=0.2)
    return layer


def _global_batch(total, dim):
    gen = torch.Generator().manual_seed(123)
    return torch.randn(total, 1, dim, generator=gen), torch.randn(total, 1, dim, generator=gen)


def _run_layer(layer, x, weights):
    x = x.clone().requires_grad_(True)
    out, _, _ = layer(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad


def _equivalence_worker(rank, world_size, parallel, centroids, expert_states, dim, ffn, total):
    num_experts = len(expert_states)
    layout = expert_layout(parallel)
    layer = BaseLayer(dim, ffn, num_experts, num_sublayers=2, eval_routing="greedy", layout=layout)
    local, first = num_experts // parallel, layout.expert_parallel_rank * num_experts // parallel
    with torch.no_grad():
        layer.centroids.copy_(centroids)
        for j in range(local):
            set_expert_weights(layer.experts, j, expert_states[first + j])
    layer.eval()  # greedy routing
    x, weights = _global_batch(total, dim)
    mine = slice(rank * total // world_size, (rank + 1) * total // world_size)
    out, x_grad = _run_layer(layer, x[mine], weights[mine])
    centroid_grad = layer.centroids.grad.clone()
    torch.distributed.all_reduce(centroid_grad)  # shared parameter: DDP would sum it
    reduce_expert_grads(layer)  # summed over replicas, divided by W
    grads = {first + j: [grad * world_size for grad in expert_grads(layer.experts, j)] for j in range(local)}
    return out, x_grad, centroid_grad, grads, layer.expert_ids.tolist()


def _near_fp16_max_worker(rank, world_size):
    layout = expert_layout(2)
    expert, shared = (torch.nn.Parameter(torch.zeros(3, dtype=torch.float16)) for _ in range(2))
    expert.expert = True
    for param in (expert, shared):
        param.grad = torch.full_like(param, 60000.0)  # fp16's largest finite value is 65504
    shared.grad.div_(world_size)  # as DDP: divide, then sum over the W workers
    torch.distributed.all_reduce(shared.grad)
    layout.reduce_expert_grads([expert])
    return expert.grad, shared.grad


def test_fp16_expert_gradients_near_the_maximum_do_not_overflow_over_their_replicas():
    """4 workers, P = 2: each expert's gradient is divided by W before it is summed over its 2
    replicas, as DDP divides the shared ones, so it overflows no sooner than they do."""
    for expert_grad, shared_grad in run_workers(_near_fp16_max_worker, 4):
        assert torch.isfinite(shared_grad).all() and torch.isfinite(expert_grad).all()
        assert torch.equal(expert_grad, torch.full((3,), 2 * 60000.0 / 4, dtype=torch.float16))


@pytest.mark.parametrize("world_size,parallel", [pytest.param(4, 4, marks=pytest.mark.slow), (4, 2)])
def test_same_outputs_and_gradients_as_one_worker(world_size, parallel):
    """W workers in expert-parallel groups of P against one process: outputs, input gradients, and
    every expert's gradient summed over its W/P replicas (equal on every replica)."""
    num_experts, dim, ffn, total = 4, 8, 16, 30
    reference = _reference_layer(num_experts, dim, ffn, seed=7).eval()
    x, weights = _global_batch(total, dim)
    ref_out, ref_x_grad = _run_layer(reference, x, weights)

    expert_states = [expert_weights(reference.experts, e) for e in range(num_experts)]
    results = run_workers(_equivalence_worker, world_size, parallel, reference.centroids.detach(), expert_states,
                          dim, ffn, total)
    out = torch.cat([r[0] for r in results])
    x_grad = torch.cat([r[1] for r in results])
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert torch.allclose(x_grad, ref_x_grad, atol=1e-5)
    for r in results:
        assert torch.allclose(r[2], reference.centroids.grad, atol=1e-5)
    for rank, r in enumerate(results):
        replica = results[rank % parallel][3]
        assert all(torch.equal(a, b) for e in r[3] for a, b in zip(r[3][e], replica[e]))
    grads_by_expert = {e: g for r in results for e, g in r[3].items()}
    assert sorted(grads_by_expert) == list(range(num_experts))
    for e, grads in grads_by_expert.items():
        for got, want in zip(grads, expert_grads(reference.experts, e)):
            assert torch.allclose(got, want, atol=1e-5)
    local = num_experts // parallel
    assert [r[4] for r in results] == [list(range(w % parallel * local, (w % parallel + 1) * local))
                                       for w in range(world_size)]


def _logged_stats(layer, x):
    with metrics.aggregate(new_root=True) as agg:
        layer(x)
    return agg.get_smoothed_values()


def _churn(layer, x, centroids):
    """The churn a layer logs when its centroids become ``centroids`` between two validations."""
    layer.stats.probe_next_batch = True
    layer(x)
    with torch.no_grad():
        layer.centroids.copy_(centroids)
    layer.stats.probe_next_batch = True
    return _logged_stats(layer, x)["base1_churn"]


def _balanced_layer_in_eval():
    return BaseLayer(8, 16, num_experts=4, router="balanced", name="base1").eval()


def _stats_worker(rank, world_size, state, x, centroids):
    layer = _balanced_layer_in_eval()
    layer.load_state_dict(state)
    mine = x.chunk(world_size)[rank]
    return _logged_stats(layer, mine), _churn(layer, mine, centroids)


def test_routing_statistics_are_the_whole_batchs_on_every_worker():
    """Greedy routing (BASE outside training) decides token by token, so the batch's
    statistics and routing churn on 2 workers must be those of one process that routes the
    whole batch."""
    torch.manual_seed(0)
    one = _balanced_layer_in_eval()
    state = {k: v.clone() for k, v in one.state_dict().items()}
    x = torch.randn(24, 1, 8) + torch.linspace(-2, 2, 24)[:, None, None]  # halves route differently
    centroids = one.centroids.detach() + 0.3 * torch.randn(4, 8)  # moves some tokens to other experts
    whole = _logged_stats(one, x)
    halves = [_logged_stats(one, half) for half in x.chunk(2)]
    assert any(abs(halves[0][k] - whole[k]) > 0.01 for k in whole)  # rank 0's own values would differ
    churn = _churn(one, x, centroids)
    one.load_state_dict(state)
    assert 0 < churn < 1 and _churn(one, x.chunk(2)[0], centroids) != churn
    for stats, worker_churn in run_workers(_stats_worker, 2, state, x, centroids):
        assert stats == whole and worker_churn == churn


def _uneven_batches_worker(rank, world_size, sizes):
    torch.manual_seed(0)
    layer = BaseLayer(8, 16, num_experts=2 * world_size, shuffle=True).train()
    x = torch.randn(sizes[rank], 2, 8, requires_grad=True)
    out, _, _ = layer(x)
    out.sum().backward()
    return tuple(out.shape)


@pytest.mark.parametrize("sizes", [[0, 5], pytest.param([3, 0, 0, 1], marks=pytest.mark.slow)])
def test_empty_batches_do_not_hang(sizes):
    # Balanced routing and shuffling in training: every collective still matches up.
    try:
        results = run_workers(_uneven_batches_worker, len(sizes), sizes, timeout=60)
    except queue.Empty:
        pytest.fail("a worker hung in all-to-all")
    assert results == [(n, 2, 8) for n in sizes]


@pytest.mark.parametrize("sizes", [[9, 10], [8, 8]])  # [8, 8]: counts known without asking
def test_shuffle_keeps_every_token_in_place(sizes):
    results = run_workers(_shuffle_worker, 2, sizes)
    assert all(results)


def _shuffle_worker(rank, world_size, sizes):
    torch.manual_seed(rank)
    layer = BaseLayer(8, 16, num_experts=4, shuffle=True).train()
    layer.experts = ScaledExperts([2.0] * layer.dispatcher.num_local_experts)  # a token comes back as (1 + gate) x
    x = torch.randn(sizes[rank], 1, 8)
    ratio = layer(x)[0] / x
    return bool(torch.allclose(ratio, ratio[..., :1].expand_as(ratio), atol=1e-5) and (ratio > 1).all()
                and (ratio < 2).all())


def _shuffled_training_worker(rank, world_size, sizes, local):
    torch.manual_seed(0)  # the same centroids on every worker, as DDP keeps them
    num_experts = world_size * local
    layer = BaseLayer(8, 16, num_experts, shuffle=True).train()
    layer.experts = ScaledExperts([expert + 2.0 for expert in layer.expert_ids.tolist()])  # e: x to (e + 2) x
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(sizes[rank], 1, 8, generator=gen, requires_grad=True)
    weights = torch.randn(sizes[rank], 1, 8, generator=gen)
    rng = torch.get_rng_state()
    out = layer(x)[0]
    (out * weights).sum().backward()
    torch.set_rng_state(rng)
    expected = _expected_shuffled_assignment(x.detach().reshape(-1, 8) @ layer.centroids.detach().t(), world_size)

    # Which expert each token got: the one whose output x + sigmoid(x . w_e) (e + 1) x it came back with.
    tokens, centroids = x.detach().reshape(-1, 8), layer.centroids.detach()
    factors = torch.arange(num_experts, dtype=torch.float) + 1
    candidates = tokens[:, None] * (1 + torch.sigmoid(tokens @ centroids.t()) * factors)[:, :, None]
    error = (candidates - out.detach().reshape(-1, 1, 8)).abs().amax(2)
    chosen = error.argmin(1)
    # The same layer written out for those experts, to check every gradient against.
    x_ref = x.detach().clone().requires_grad_(True)
    centroids_ref = centroids.clone().requires_grad_(True)
    t = x_ref.reshape(-1, 8)
    gate = torch.sigmoid((t * centroids_ref[chosen]).sum(1, keepdim=True))
    ((t + gate * factors[chosen][:, None] * t).view_as(out) * weights).sum().backward()
    grads = torch.stack([layer.centroids.grad, centroids_ref.grad])
    torch.distributed.all_reduce(grads)  # shared parameter: DDP would sum it
    return (bool((error.min(1).values < 1e-5).all()), torch.bincount(chosen, minlength=num_experts),
            torch.allclose(x.grad, x_ref.grad, atol=1e-5), torch.allclose(grads[0], grads[1], atol=1e-5),
            torch.equal(chosen, expected))


def _expected_shuffled_assignment(scores, world_size):
    """The paper's shuffled routing, written out: each worker deals its tokens in a random order
    (the layer's randperm, replayed) evenly to the W routers, and router v gives its sample the
    balanced assignment. Returns the expert of each of this worker's tokens."""
    order = torch.randperm(scores.size(0))
    everyone = [None] * world_size
    torch.distributed.all_gather_object(everyone, (scores, order))
    dealt = [[] for _ in range(world_size)]  # dealt[w][v]: worker w's tokens in router v's sample
    for w, (worker_scores, worker_order) in enumerate(everyone):
        # tensor_split, like the layer, gives the remainder to the first routers
        sizes = [len(part) for part in torch.arange(worker_scores.size(0)).tensor_split(world_size)]
        dealt[w] = list(worker_order.split(sizes))
    rank = torch.distributed.get_rank()
    expert = torch.empty(scores.size(0), dtype=torch.long)
    for v in range(world_size):
        sample = torch.cat([everyone[w][0][dealt[w][v]] for w in range(world_size)])
        assigned = balanced_assignment(sample).split([len(dealt[w][v]) for w in range(world_size)])
        expert[dealt[rank][v]] = assigned[rank]
    return expert


@pytest.mark.parametrize("sizes,local", [([8, 8], 2), ([9, 10], 1), pytest.param([3, 0, 5, 8], 1, marks=pytest.mark.slow),
                                         ([12, 4, 7, 9], 2)])
def test_shuffled_training_sends_each_token_to_one_expert_with_balanced_loads(sizes, local):
    results = run_workers(_shuffled_training_worker, len(sizes), sizes, local)
    assert all(r[0] for r in results), "a token came back with no expert's output"
    assert all(r[2] and r[3] for r in results), "gradients differ from the layer written out"
    assert all(r[4] for r in results), "a token's expert is not its router's balanced assignment"
    loads = sum(r[1] for r in results)
    # Each worker's router balances the random sample it gets: together, every expert's load is
    # within one token per router of every other's, and exactly equal when the samples divide.
    assert loads.sum() == sum(sizes) and loads.max() - loads.min() <= len(sizes)
    if sizes == [8, 8]:
        assert loads.tolist() == [4, 4, 4, 4]


def _expert_init_worker(rank, world_size, num_experts):
    torch.manual_seed(11)
    layer = BaseLayer(8, 16, num_experts=num_experts)
    return (layer.expert_ids.tolist(), [expert_weights(layer.experts, j) for j in range(len(layer.expert_ids))],
            layer.centroids.detach())


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_a_model_for_w_workers_holds_the_experts_of_the_one_process_model(world_size):
    torch.manual_seed(11)
    one = BaseLayer(8, 16, num_experts=4)
    for ids, states, centroids in run_workers(_expert_init_worker, world_size, 4):
        assert torch.equal(centroids, one.centroids.detach())
        for global_id, state in zip(ids, states):
            for key, value in expert_weights(one.experts, global_id).items():
                assert torch.equal(state[key], value), (global_id, key)


def _step_collectives_worker(rank, world_size, micro_batches):
    """Two expert layers trained on ``micro_batches`` micro-batches, then the optimizer step's hook:
    how many all-reduces the forwards and the step made, what was logged, and this worker's counts."""
    import torch.distributed as dist

    torch.manual_seed(0)
    layers = nn.ModuleList([BaseLayer(8, 16, num_experts=2 * world_size, shuffle=False, name=f"base{i}")
                            for i in (1, 2)]).train()
    calls, all_reduce = [], dist.all_reduce

    def counted(*args, **kwargs):
        calls.append(args[0].numel())
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted  # layer.py calls torch.distributed.all_reduce
    with metrics.aggregate(new_root=True) as agg:
        for _ in range(micro_batches):
            x = torch.randn(6, 2, 8) + rank
            for layer in layers:
                x = layer(x)[0]
            x.sum().backward()
        in_forwards = len(calls)
        mine = [layer.stats.step_counts.clone() for layer in layers]
        reduce_routing_stats(layers)
    return in_forwards, len(calls) - in_forwards, agg.get_smoothed_values(), mine


def test_routing_statistics_cost_one_all_reduce_per_optimizer_step():
    """Training forwards make no all-reduce for the routing statistics (there was one per expert
    layer per forward: 4 here); the step's hook makes one for every layer and micro-batch together,
    and logs each layer's statistics of the whole step: every micro-batch of every worker."""
    results = run_workers(_step_collectives_worker, 2, 2)
    in_forwards, in_step, logged, _ = results[0]
    assert (in_forwards, in_step) == (0, 1)
    assert all(result[:3] == results[0][:3] for result in results)  # every worker logs the same
    for i, name in enumerate(("base1", "base2")):
        summed = sum(result[3][i] for result in results)
        expected = stats_from_counts(summed, 4)
        assert summed[-1] == 2 * 2 * 12  # tokens: 2 workers x 2 micro-batches x 12
        assert {key: logged[f"{name}_{key}"] for key in expected} == pytest.approx(
            {key: round(float(value), 3) for key, value in expected.items()})

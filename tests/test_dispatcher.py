"""The dispatcher's pure index arithmetic, without a process group."""

import torch

from fairseq_base.dispatcher import read_replies, route_shuffled, shuffle_replies
from fairseq_base.router import balanced_routing, count_per_expert, greedy_routing


def test_a_routers_replies_say_which_expert_and_what_each_worker_will_receive():
    # W = 2 workers, L = 2 local experts (worker 0 holds experts 0 and 1, worker 1 experts 2 and 3).
    # This router got 2 tokens from worker 0 and 3 from worker 1, and chose these experts:
    chosen = torch.tensor([3, 0, 1, 1, 2])
    replies = shuffle_replies(chosen, [2, 3], torch.tensor([2, 3]), local=2)
    # To worker 0: its tokens' experts, then tokens for its experts 0 and 1 from worker 0 (one for
    # expert 0) and from worker 1 (two for expert 1).
    assert replies[:6].tolist() == [3, 0, 1, 0, 0, 2]
    # To worker 1: its tokens' experts, then for its experts 2 and 3: worker 0's token to expert 3,
    # worker 1's token to expert 2.
    assert replies[6:].tolist() == [1, 1, 2, 0, 1, 1, 0]


def test_a_worker_reads_its_experts_and_what_it_will_receive_from_every_router():
    # Worker 0 sent 2 tokens to router 0 and 1 token to router 1 (W = 2, L = 2).
    from_router_0 = [3, 0, 1, 0, 0, 2]  # experts of its 2 tokens; counts [v * L + j]
    from_router_1 = [2, 0, 1, 1, 0]
    chosen, recv_counts = read_replies(torch.tensor(from_router_0 + from_router_1), sent=[2, 1], local=2)
    assert chosen.tolist() == [3, 0, 2]
    # Worker v's tokens for local expert j, summed over the routers: v=0: (1 + 0, 0 + 1); v=1: (0 + 1, 2 + 0).
    assert recv_counts.tolist() == [[1, 1], [1, 2]]


def test_shuffled_routing_in_one_process_routes_the_tokens_in_a_random_order_and_maps_the_experts_back():
    torch.manual_seed(0)
    scores = torch.randn(12, 4)
    expert_ids, recv_counts, routing, sample = route_shuffled(scores, torch.tensor([12]), greedy_routing, local=4)
    assert not torch.equal(sample, scores) and sorted(map(tuple, sample.tolist())) == sorted(map(tuple, scores.tolist()))
    assert torch.equal(routing.expert_ids[:, 0], sample.argmax(1))  # the router routed the sample
    assert torch.equal(expert_ids, scores.argmax(1))  # each token gets its own choice back
    assert recv_counts.tolist() == [count_per_expert(expert_ids, 4).tolist()]  # what expert j will receive
    balanced, _, _, _ = route_shuffled(scores, torch.tensor([12]), balanced_routing, local=4)
    assert count_per_expert(balanced, 4).tolist() == [3, 3, 3, 3]

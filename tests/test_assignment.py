import faulthandler
import logging
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.optimize import linear_sum_assignment

import fairseq_base.assignment as assignment
from fairseq_base.assignment import balanced_assignment, greedy_assignment


@pytest.fixture(params=["kernel", "torch"], autouse=True)
def backend(request, monkeypatch):
    """Run every test on both solvers: the compiled auction (which also solves CUDA scores, on a
    host copy) and the PyTorch one (used where the kernel cannot be built). A solver that never
    ends fails the run after 120 s instead of hanging it (the kernel cannot be interrupted)."""
    if request.param == "torch":
        monkeypatch.setattr(assignment, "_cpu_kernel", lambda: None)
    faulthandler.dump_traceback_later(120, exit=True)
    yield request.param
    faulthandler.cancel_dump_traceback_later()


def assert_balanced(ids, num_tokens, num_experts):
    assert ids.dtype == torch.long and ids.shape == (num_tokens,)
    load = torch.bincount(ids, minlength=num_experts)
    assert load.numel() == num_experts
    assert int(load.min()) == num_tokens // num_experts
    assert int(load.max()) == -(-num_tokens // num_experts)


def exact_optimum(scores):
    """Optimum of the balanced problem by scipy on the expanded problem: floor(T/E) slots per
    expert that must be filled (a large bonus) and one optional slot for the remainder."""
    s = scores.double().numpy()
    num_tokens, num_experts = s.shape
    per_expert, remainder = divmod(num_tokens, num_experts)
    bonus = 1e6
    blocks = [s + bonus] * per_expert + ([s] if remainder else [])
    rows, cols = linear_sum_assignment(np.concatenate(blocks, axis=1), maximize=True)
    return s[rows, cols % num_experts].sum()


def objective(scores, ids):
    return scores.double()[torch.arange(len(ids)), ids].sum().item()


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 300), st.integers(1, 17), st.integers(0, 2**31 - 1))
def test_balanced_for_any_shape(num_tokens, num_experts, seed):
    scores = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))
    assert_balanced(balanced_assignment(scores), num_tokens, num_experts)


def _problem(kind, num_tokens, num_experts, gen):
    if kind == "random":
        return torch.randn(num_tokens, num_experts, generator=gen)
    if kind == "all_equal":
        return torch.full((num_tokens, num_experts), 0.5)
    if kind == "heavy_ties":
        return torch.randint(0, 3, (num_tokens, num_experts), generator=gen).float()
    if kind == "popular_expert":
        scores = torch.rand(num_tokens, num_experts, generator=gen)
        scores[:, 0] += 100.0
        return scores
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["random", "all_equal", "heavy_ties", "popular_expert"])
def test_within_a_tenth_of_a_percent_of_the_optimum(kind):
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        num_tokens = int(torch.randint(1, 80, (1,), generator=gen))
        num_experts = int(torch.randint(2, 9, (1,), generator=gen))
        scores = _problem(kind, num_tokens, num_experts, gen)
        ids = balanced_assignment(scores)
        assert_balanced(ids, num_tokens, num_experts)
        best = exact_optimum(scores)
        assert objective(scores, ids) >= best - 1e-3 * abs(best) - 1e-9


@pytest.mark.parametrize("num_tokens,num_experts", [(512, 8), (2048, 16)])
def test_beats_libbase_quality_on_the_issue_sizes(num_tokens, num_experts):
    # libbase is 0.09-0.25% below the optimum here; require better than 0.01%.
    gen = torch.Generator().manual_seed(1)
    centroids = torch.nn.init.orthogonal_(torch.empty(num_experts, 64), generator=gen)
    scores = torch.randn(num_tokens, 64, generator=gen) @ centroids.t()
    ids = balanced_assignment(scores)
    assert_balanced(ids, num_tokens, num_experts)
    best = exact_optimum(scores)
    assert objective(scores, ids) >= best - 1e-4 * abs(best)


def test_nan_and_inf_do_not_break_it():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(50, 4, generator=gen)
    scores[0] = float("nan")
    scores[1, 2] = float("inf")
    scores[2, :] = float("-inf")
    scores[3, 1] = float("nan")
    ids = balanced_assignment(scores)
    assert_balanced(ids, 50, 4)
    assert ids[1] == 2  # the only +inf score wins
    assert_balanced(balanced_assignment(torch.full((7, 3), float("nan"))), 7, 3)
    assert greedy_assignment(torch.tensor([[float("nan"), 1.0, 0.0]])).tolist() == [1]


def test_stand_ins_are_computed_only_for_scores_that_need_them(backend, monkeypatch):
    """The kernel's one pass over the scores finds NaN and inf; finite scores skip the stand-ins."""
    if backend == "torch":
        pytest.skip("the PyTorch auction always computes the stand-ins (on the device, without reading them)")
    calls, sanitize = [], assignment.sanitize_scores
    monkeypatch.setattr(assignment, "sanitize_scores", lambda s, dtype: calls.append(1) or sanitize(s, dtype))
    scores = torch.randn(64, 4, generator=torch.Generator().manual_seed(4))
    for dtype in (torch.float32, torch.float64):
        assert assignment._cpu_kernel().auction_assignment(scores.to(dtype).clone().fill_(float("nan")), 1e-3, 1e-9,
                                                           16.0, 1000).numel() == 0
    balanced_assignment(scores)
    assert calls == []
    scores[5, 1] = float("inf")
    assert balanced_assignment(scores)[5] == 1 and calls == [1]


def test_every_installed_build_this_cpu_runs_gives_the_same_assignment(backend):
    """setup.py builds the kernel for each x86-64 vector width; the loader takes the widest the
    CPU supports, and every build solves alike."""
    capability = torch.backends.cpu.get_cpu_capability()
    runnable = assignment.KERNEL_VARIANTS.get(capability, ("_auction",))
    builds = []
    for name in runnable:
        try:
            builds.append(__import__(f"fairseq_base.{name}", fromlist=["_"]))
        except ImportError:
            pass
    if backend == "torch":
        pytest.skip("checks the compiled kernel, which the torch backend does not use")
    if not builds:
        pytest.skip("no installed kernel (a checkout used without installing it): pip install -e . builds it")
    assert assignment._cpu_kernel() is builds[0]  # the widest this CPU runs
    scores = torch.randn(2000, 24, generator=torch.Generator().manual_seed(5))
    rows = assignment._slot_rows(2000, 24)
    slots = [build.auction_assignment(scores, *assignment._eps_range(rows), assignment.EPS_FACTOR, 1000 * rows)
             for build in builds]
    assert all(torch.equal(slot, slots[0]) for slot in slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    scores = torch.randn(33, 5, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert_balanced(balanced_assignment(scores), 33, 5)


def test_prefers_top1_when_that_is_balanced():
    scores = torch.eye(4).repeat(3, 1)  # token t prefers expert t % 4, three tokens each
    assert balanced_assignment(scores).tolist() == list(range(4)) * 3


def test_edge_shapes_and_bad_input():
    assert balanced_assignment(torch.empty(0, 3)).shape == (0,)
    assert balanced_assignment(torch.randn(5, 1)).tolist() == [0] * 5
    assert_balanced(balanced_assignment(torch.randn(2, 7)), 2, 7)
    with pytest.raises(ValueError):
        balanced_assignment(torch.randn(5))
    with pytest.raises(ValueError):
        balanced_assignment(torch.randn(5, 0))
    with pytest.raises(TypeError):
        balanced_assignment(torch.ones(5, 2, dtype=torch.long))


def test_never_imports_libbase():
    import subprocess
    import sys
    code = ("import sys, torch; from fairseq_base.assignment import balanced_assignment; "
            "balanced_assignment(torch.randn(64, 4)); assert 'fairseq.libbase' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def _ties_of_one_ulp():
    """4096 x 8 float32 scores of 1.0 and the next float up: the kernel's old final epsilon
    (a millionth of the spread over the rows) vanished next to 1.0 and it bid forever."""
    gen = torch.Generator().manual_seed(5)
    return torch.where(torch.rand(4096, 8, generator=gen) < 0.5, torch.tensor(1.0),
                       torch.tensor(1.0).nextafter(torch.tensor(2.0)))


def solved_or_hung(scores, watchdog_s=60):
    """balanced_assignment(scores), failing as "hung" if it has not ended after ``watchdog_s``
    (generous: these take milliseconds; speed is the benchmarks' business)."""
    result = []
    solver = threading.Thread(target=lambda: result.append(balanced_assignment(scores)), daemon=True)
    solver.start()
    solver.join(watchdog_s)
    if solver.is_alive():
        pytest.fail(f"balanced_assignment hung: no result after {watchdog_s} s on {tuple(scores.shape)} "
                    f"{scores.dtype} scores", pytrace=False)
    assert result, "balanced_assignment raised (its traceback is above)"
    return result[0]


# Finite scores on which the auction used to loop forever (issue 13).
ENDLESS_BEFORE = {
    "1e30 everywhere": lambda gen: torch.full((4, 2), 1e30),
    "1e9 everywhere": lambda gen: torch.full((64, 4), 1e9),
    "1e30 + randn, float32": lambda gen: 1e30 + torch.randn(64, 4, generator=gen),
    "1e3 + 1e-10 randn, float64": lambda gen: 1e3 + 1e-10 * torch.randn(64, 4, generator=gen, dtype=torch.float64),
    "1e20 + randn, float64": lambda gen: 1e20 + torch.randn(64, 4, generator=gen, dtype=torch.float64),
    "one-ulp ties": lambda gen: _ties_of_one_ulp(),
}


@pytest.mark.parametrize("name", list(ENDLESS_BEFORE))
def test_inputs_that_used_to_loop_forever_end_balanced(name):
    scores = ENDLESS_BEFORE[name](torch.Generator().manual_seed(4))
    assert_balanced(solved_or_hung(scores), *scores.shape)


def test_a_large_offset_does_not_change_the_assignment():
    # Shifting every row by a constant leaves the optimum as it is; in float64 an offset of
    # 1e6 keeps the differences exact enough that the assignment must be the same.
    scores = torch.randn(300, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    offsets = torch.randint(-3, 4, (300, 1), generator=torch.Generator().manual_seed(7)).double() * 1e6
    assert torch.equal(balanced_assignment(scores + offsets), balanced_assignment(scores))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(2, 9), st.integers(-30, 30), st.integers(-30, 30),
       st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]), st.integers(0, 2**31 - 1))
def test_ends_balanced_at_every_magnitude_and_precision(num_tokens, num_experts, offset_exp, spread_exp, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    sign = 1.0 if seed % 2 else -1.0
    scores = (sign * 10.0 ** offset_exp + 10.0 ** spread_exp * torch.randn(num_tokens, num_experts, generator=gen,
                                                                          dtype=torch.float64)).to(dtype)
    assert_balanced(solved_or_hung(scores), num_tokens, num_experts)


@pytest.mark.parametrize("num_tokens,num_experts", [(50, 7), (64, 4), (3, 5), (1000, 16)])
def test_capped_auction_is_finished_with_exact_balance(monkeypatch, caplog, num_tokens, num_experts):
    """With a cap of one bid per row (kernel) or one round (PyTorch) the auction stops early
    and the fallback fills every slot: still exactly balanced, with a warning."""
    monkeypatch.setattr(assignment, "MAX_BIDS_PER_ROW", 1)
    monkeypatch.setattr(assignment, "MAX_ROUNDS", 1)
    scores = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(8))
    scores[:, 0] += 3.0  # everyone wants expert 0: an early stop leaves many rows without a slot
    with caplog.at_level(logging.WARNING, logger="fairseq_base.assignment"):
        ids = balanced_assignment(scores)
    assert_balanced(ids, num_tokens, num_experts)
    assert "reached its cap" in caplog.text


def test_fallback_gives_phantom_rows_the_extra_slots():
    """Phantom rows (T mod E != 0) may take only extra slots; when tokens hold all of them the
    fallback moves a token to a free main slot. 5 tokens, 2 experts: main slots 0, 1 (two
    each), extra slots 2, 3, and one phantom (row 5)."""
    scores = torch.tensor([[1.0, 0.0]] * 5)
    slot = torch.tensor([2, 3, 0, 0, -1, -1])  # tokens hold both extra slots; token 4 and the phantom wait
    done = assignment._complete_assignment(slot, scores)
    assert sorted(done.tolist()) == [0, 0, 1, 1, 2, 3]
    assert done[5] in (2, 3)  # the phantom holds an extra slot
    assert_balanced(done[:5] % 2, 5, 2)


@pytest.mark.cuda
def test_cuda_scores_are_solved_on_the_host_with_the_same_result():
    scores = torch.randn(2048, 128, generator=torch.Generator().manual_seed(9))
    ids = balanced_assignment(scores.cuda())
    assert ids.device.type == "cuda"
    assert torch.equal(ids.cpu(), balanced_assignment(scores))

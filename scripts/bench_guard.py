#!/usr/bin/env python3
"""Speed guard: rerun the solver against fairseq's libbase and the BASE layer at E = 1 and 64 at
small sizes (under a minute on 2 cores), and compare each ratio with the committed figure in
docs/performance.md ("Speed guard").

    python scripts/bench_guard.py [--repeats 9] [--tolerance 0.15]

Run it after any change under fairseq_base/ that the benchmarks cover (the solver, the layer,
the experts, the dispatcher), on a quiet machine, and compare like with like: the figures are
ratios measured within one run, so they carry from one machine to another better than times do,
but not perfectly. One line per figure with its verdict; a ratio more than --tolerance worse
than committed says so plainly. It is a benchmark, not a test: it never fails CI, and its exit
status is 0 whatever it finds (1 only if the committed figures cannot be read).

On a busy machine it judges nothing: where other processes load the machine when it starts
(the 1-minute load average above half its cores), or a figure's paired repeats spread by more
than --tolerance (the interquartile range of the ratios over their median), it says "machine
busy, not judged" with the load and the spread, instead of "SLOWER" or "faster".
"""

import argparse
import os
import re
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's fairseq_base
sys.path.insert(0, HERE)
from bench_assignment import libbase_assignment, problem  # noqa: E402
from bench_layer import DenseFeedForward, step  # noqa: E402

from fairseq_base.assignment import balanced_assignment  # noqa: E402
from fairseq_base.layer import BaseLayer  # noqa: E402

PERFORMANCE = os.path.join(os.path.dirname(HERE), "docs", "performance.md")
# glibc keeps freed memory in the process: otherwise each step's fresh weight gradients fault
# their pages in again, at random cost, which made E=64 over E=1 swing from 1.5x to 2x between
# runs (docs/performance.md, "Many experts per worker"). Set before the process starts.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "8000000000"}
LAYER = dict(tokens=2048, dim=128, ffn=512, sublayers=1)
# figure -> whether a larger ratio is better
FIGURES = {
    "solver speed-up over libbase, 2048 x 16": True,
    "solver speed-up over libbase, 8192 x 64": True,
    "BASE layer E=1 over dense FFN block": False,
    "BASE layer E=64 over E=1": False,
}


def alternate(functions, repeats):
    """Seconds of each function per repeat, called in alternation ``repeats`` times after a warm-up."""
    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numerator, denominator):
    """(the median of the repeats' ratios, their spread: interquartile range over the median)."""
    ratios = [n / d for n, d in zip(numerator, denominator)]
    low, middle, high = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), (high - low) / statistics.median(ratios)


def measure(repeats):
    """{figure: (ratio, spread)}."""
    ratios = {}
    for tokens, experts in ((2048, 16), (8192, 64)):
        scores = problem(tokens, experts)
        s = alternate({"ours": lambda: balanced_assignment(scores), "libbase": lambda: libbase_assignment(scores)},
                      repeats)
        ratios[f"solver speed-up over libbase, {tokens} x {experts}"] = paired_ratio(s["libbase"], s["ours"])
    torch.manual_seed(0)
    modules = {e: BaseLayer(LAYER["dim"], LAYER["ffn"], e, num_sublayers=LAYER["sublayers"]) for e in (1, 64)}
    modules["dense"] = DenseFeedForward(LAYER["dim"], LAYER["ffn"], LAYER["sublayers"])
    for module in modules.values():
        for p in module.parameters():  # away from the zero-initialised last projection
            torch.nn.init.normal_(p, std=0.02)
        module.train()
    x = torch.randn(LAYER["tokens"], 1, LAYER["dim"], requires_grad=True)
    s = alternate({name: (lambda m=module: step(m, x)) for name, module in modules.items()}, repeats)
    ratios["BASE layer E=1 over dense FFN block"] = paired_ratio(s[1], s["dense"])
    ratios["BASE layer E=64 over E=1"] = paired_ratio(s[64], s[1])
    return ratios


def committed_figures(path=PERFORMANCE):
    """{figure: ratio} from the rows ``| `figure` | 1.23x | ...`` of docs/performance.md."""
    with open(path, encoding="utf-8") as f:
        rows = re.findall(r"^\| `([^`]+)` \| ([0-9.]+)x \|", f.read(), flags=re.M)
    return {name: float(value) for name, value in rows if name in FIGURES}


def verdict(name, measured, committed, tolerance, busy=None):
    """The figure against its committed value; ``busy``: why the machine was too busy to judge."""
    if busy:
        return f"machine busy, not judged ({busy}); rerun on a quiet machine"
    larger_is_better = FIGURES[name]
    change = (measured / committed - 1) if larger_is_better else (committed / measured - 1)
    if change < -tolerance:
        return f"SLOWER: {100 * -change:.0f}% worse than committed (more than {100 * tolerance:.0f}%)"
    if change > tolerance:
        return f"faster: {100 * change:.0f}% better than committed (update docs/performance.md)"
    return f"as committed ({100 * change:+.0f}%)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--tolerance", type=float, default=0.15, help="the worsening that counts as a loss")
    args = parser.parse_args()
    if any(os.environ.get(key) != value for key, value in KEEP_FREED_MEMORY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY})
    committed = committed_figures()
    missing = sorted(set(FIGURES) - set(committed))
    if missing:
        print(f"bench_guard: error: {PERFORMANCE} has no committed figure for {', '.join(missing)} "
              "(rows | `figure` | 1.23x | in its Speed guard table)", file=sys.stderr)
        return 1
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    print(f"| speed guard: {torch.get_num_threads()} threads, median of {args.repeats}, layer at "
          f"T={LAYER['tokens']} d={LAYER['dim']} ffn={LAYER['ffn']}, freed memory kept; load {load:.1f} on "
          f"{cores} cores at the start", flush=True)
    for name, (value, spread) in measure(args.repeats).items():
        busy = "; ".join(reason for reason, applies in (
            (f"load {load:.1f} from other processes on {cores} cores", load > cores / 2),
            (f"its repeats spread {100 * spread:.0f}%, more than {100 * args.tolerance:.0f}%",
             spread > args.tolerance)) if applies)
        print(f"{name}: {value:.2f}x (committed {committed[name]:.2f}x, spread {100 * spread:.0f}%): "
              f"{verdict(name, value, committed[name], args.tolerance, busy)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Balanced assignment: fairseq_base's auction against fairseq's libbase, greedy top-1 and
Sinkhorn's approximate balance (S-BASE, ``--base-router sbase``).

    python scripts/bench_assignment.py [--repeats 7] [--json runs/bench/assignment.json]

Scores are random hidden states times orthogonal expert centroids. Methods run in
alternation, each timed `--repeats` times; the table shows medians, the speed-up over
libbase, and each solver's objective (sum of chosen scores) against libbase's and, where
small enough, against the exact optimum (scipy on the expanded problem). A second table
compares Sinkhorn with the auction on speed, balance (busiest and idlest expert over the
mean load) and objective. A third times the kernel alone as installed (the build for this
CPU's vector width, from setup.py) against a -march=native build of the same source.
"""

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from fairseq_base import assignment
from fairseq_base.assignment import _torch_auction_assignment, balanced_assignment, sinkhorn_assignment

SIZES = [(512, 8), (2048, 16), (8192, 64), (16384, 128)]
# On CUDA also the paper's layout: 2048 tokens per GPU, one expert per GPU on 128 GPUs.
CUDA_SIZES = [(512, 8), (2048, 16), (2048, 128), (8192, 64), (16384, 128)]
TORCH_AUCTION_MAX_TOKENS = 4096  # larger problems take the GPU auction seconds per call


def libbase_assignment(scores):
    """fairseq's libbase returns tokens sorted by expert, T/E per expert."""
    from fairseq import libbase
    order = libbase.balanced_assignment(scores)
    ids = torch.empty_like(order)
    ids[order] = torch.arange(scores.size(0)) // (scores.size(0) // scores.size(1))
    return ids


def exact_objective(scores):
    from scipy.optimize import linear_sum_assignment
    s = scores.double().numpy()
    per_expert = s.shape[0] // s.shape[1]
    rows, cols = linear_sum_assignment(np.concatenate([s] * per_expert, axis=1), maximize=True)
    return float(s[rows, cols % s.shape[1]].sum())


def problem(tokens, experts, dim=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centroids = torch.nn.init.orthogonal_(torch.empty(experts, dim), generator=gen)
    return torch.randn(tokens, dim, generator=gen) @ centroids.t()


def timed(fn, scores, repeats, cuda):
    """Median seconds of ``repeats`` calls fn(scores), synchronising the GPU around each."""
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(scores)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cuda_rows(repeats):
    """Where CUDA scores are best solved: the host kernel (copy, solve, copy back) or on the GPU."""
    methods = {"kernel on a host copy": balanced_assignment, "PyTorch auction on the GPU": _torch_auction_assignment,
               "Sinkhorn on the GPU": sinkhorn_assignment}
    rows = []
    for tokens, experts in CUDA_SIZES:
        scores = problem(tokens, experts).cuda()
        chosen = {name: fn for name, fn in methods.items()
                  if name != "PyTorch auction on the GPU" or tokens <= TORCH_AUCTION_MAX_TOKENS}
        for fn in chosen.values():
            fn(scores)  # warm-up
        ms = {name: [] for name in chosen}
        for _ in range(repeats):  # alternate the methods
            for name, fn in chosen.items():
                ms[name].append(1e3 * timed(fn, scores, 1, cuda=True))
        rows.append({"tokens": tokens, "experts": experts, "ms": {n: statistics.median(t) for n, t in ms.items()}})
        print(f"| cuda {tokens}x{experts} done", flush=True)
    return rows


def print_cuda_table(rows):
    print(f"\nbalanced assignment of CUDA scores on {torch.cuda.get_device_name()}, median ms "
          "(transfers included)")
    print("| T x E | kernel on a host copy | PyTorch auction on the GPU | Sinkhorn on the GPU | faster exact solver |")
    print("|---|---|---|---|---|")
    for r in rows:
        ms = r["ms"]
        gpu = ms.get("PyTorch auction on the GPU")
        faster = "host kernel" if gpu is None or ms["kernel on a host copy"] <= gpu else "GPU auction"
        gpu_text = f"{gpu:.2f}" if gpu is not None else f"not run (T > {TORCH_AUCTION_MAX_TOKENS})"
        print(f"| {r['tokens']} x {r['experts']} | {ms['kernel on a host copy']:.2f} | {gpu_text} | "
              f"{ms['Sinkhorn on the GPU']:.2f} | {faster} |")


def build_rows(repeats):
    """The kernel alone: the installed build this CPU loads against -march=native, same source."""
    from torch.utils.cpp_extension import load
    source = os.path.join(os.path.dirname(assignment.__file__), "csrc", "auction.cpp")
    builds = {"installed": assignment._cpu_kernel(),
              "-march=native": load(name="fairseq_base_auction_bench_native", sources=[source],
                                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])}
    rows = []
    for tokens, experts in SIZES[2:]:
        scores = problem(tokens, experts)
        slot_rows = assignment._slot_rows(tokens, experts)
        args = (*assignment._eps_range(slot_rows), assignment.EPS_FACTOR, assignment.MAX_BIDS_PER_ROW * slot_rows)
        ms = {name: [] for name in builds}
        for _ in range(repeats):
            for name, build in builds.items():
                ms[name].append(1e3 * timed(lambda s: build.auction_assignment(s, *args), scores, 1, cuda=False))
        rows.append({"tokens": tokens, "experts": experts, "ms": {n: statistics.median(t) for n, t in ms.items()}})
    return builds["installed"].__name__.rsplit(".", 1)[-1], rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="runs/bench/assignment.json")
    args = parser.parse_args()

    methods = {"fairseq_base": balanced_assignment, "libbase": libbase_assignment,
               "greedy": lambda s: s.argmax(dim=1), "sinkhorn": sinkhorn_assignment}
    rows = []
    for tokens, experts in SIZES:
        scores = problem(tokens, experts)
        times = {name: [] for name in methods}
        ids = {name: fn(scores) for name, fn in methods.items()}  # warm-up (and kernel build)
        for _ in range(args.repeats):
            for name, fn in methods.items():
                times[name].append(timed(fn, scores, 1, cuda=False))
        objective = {name: float(scores.double()[torch.arange(tokens), i].sum()) for name, i in ids.items()}
        load = torch.bincount(ids["fairseq_base"], minlength=experts)
        sinkhorn_load = torch.bincount(ids["sinkhorn"], minlength=experts).float()
        row = {
            "tokens": tokens, "experts": experts,
            "ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
            "objective": objective,
            "balanced": int(load.max() - load.min()) == 0,
            "top1_share": float((ids["fairseq_base"] == ids["greedy"]).float().mean()),
            "sinkhorn_load_max": float(sinkhorn_load.max() / sinkhorn_load.mean()),
            "sinkhorn_load_min": float(sinkhorn_load.min() / sinkhorn_load.mean()),
        }
        row["speedup_vs_libbase"] = row["ms"]["libbase"] / row["ms"]["fairseq_base"]
        if tokens <= 2048:
            optimum = exact_objective(scores)
            row["gap_to_optimum"] = {n: (optimum - objective[n]) / abs(optimum) for n in ("fairseq_base", "libbase")}
        rows.append(row)
        print(f"| {tokens}x{experts} done", flush=True)

    print(f"\nbalanced assignment on {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats}")
    print("| T x E | fairseq_base ms | libbase ms | greedy ms | speed-up vs libbase | objective - libbase's "
          "| gap to optimum (ours / libbase) | top-1 share |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gap = r.get("gap_to_optimum")
        gap_text = f"{100 * gap['fairseq_base']:.4f}% / {100 * gap['libbase']:.4f}%" if gap else "n/a"
        print(f"| {r['tokens']} x {r['experts']} | {r['ms']['fairseq_base']:.2f} | {r['ms']['libbase']:.2f} | "
              f"{r['ms']['greedy']:.2f} | {r['speedup_vs_libbase']:.1f}x | "
              f"{r['objective']['fairseq_base'] - r['objective']['libbase']:+.3f} | {gap_text} | "
              f"{100 * r['top1_share']:.1f}% |")
    print("\nSinkhorn (S-BASE) against the auction: load of the busiest / idlest expert over the mean "
          "(the auction's is 1 / 1)")
    print("| T x E | auction ms | Sinkhorn ms | Sinkhorn load max / min | Sinkhorn objective - auction's |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} x {r['experts']} | {r['ms']['fairseq_base']:.2f} | {r['ms']['sinkhorn']:.2f} | "
              f"{r['sinkhorn_load_max']:.3f} / {r['sinkhorn_load_min']:.3f} | "
              f"{r['objective']['sinkhorn'] - r['objective']['fairseq_base']:+.3f} |")
    build, kernel_rows = build_rows(args.repeats)
    print(f"\nthe kernel alone: the installed build this CPU loads ({build}; torch finds "
          f"{torch.backends.cpu.get_cpu_capability()}) against -march=native, median ms")
    print("| T x E | installed | -march=native | installed / native |")
    print("|---|---|---|---|")
    for r in kernel_rows:
        ms = r["ms"]
        print(f"| {r['tokens']} x {r['experts']} | {ms['installed']:.2f} | {ms['-march=native']:.2f} | "
              f"{ms['installed'] / ms['-march=native']:.2f} |")
    report = {"machine": platform.platform(), "threads": torch.get_num_threads(), "rows": rows,
              "kernel_build": build, "kernel_rows": kernel_rows}
    if torch.cuda.is_available():
        report["cuda_device"] = torch.cuda.get_device_name()
        report["cuda_rows"] = cuda_rows(args.repeats)
        print_cuda_table(report["cuda_rows"])
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

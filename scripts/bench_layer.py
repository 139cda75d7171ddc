#!/usr/bin/env python3
"""The BASE layer with 1 to 64 local experts, against a dense FFN block of the same per-token FLOPs
(forward + backward, one process).

    python scripts/bench_layer.py [--tokens 2048 --dim 128 --ffn 512 --sublayers 3 --experts 1,4,16,64]
                                  [--device cuda] [--dtype bf16] [--json runs/bench/layer.json]

Every token passes through one expert of ``--sublayers`` FFN sublayers (LayerNorm, d->ffn->d)
whatever the expert count, as it passes through the dense block's sublayers: the compute per
token is the same, and what changes with E is routing (the balanced assignment in training)
and how the local experts run. They run as batched matrix products over their stacked
weights; the row "one by one" times the same layer at the largest E with its experts run one
after another (as before the weights were stacked, and as now when padding would more than
double the rows). Each step starts without gradients, as fairseq's does: E experts then write
E times the weight gradients of one. Runs alternate; the table shows medians and ratios to
E = 1, and the host's minor page faults per step: on CPU, glibc gives the memory of large freed
tensors back to the system, so that each step's new weight gradients fault it in again (the
CUDA caching allocator keeps it). To time the layer without that cost on CPU:

    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=8000000000 python scripts/bench_layer.py
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's fairseq_base
from fairseq_base import experts as experts_module  # noqa: E402
from fairseq_base.experts import LocalExperts  # noqa: E402
from fairseq_base.layer import BaseLayer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DenseFeedForward(torch.nn.Module):
    """x + the residual FFN sublayers of one expert: the block a dense model has instead."""

    def __init__(self, dim, ffn, sublayers):
        super().__init__()
        self.ffn = LocalExperts([0], dim, ffn, sublayers)

    def forward(self, x):
        tokens = x.reshape(-1, x.size(-1))
        return (tokens + self.ffn(tokens, [tokens.size(0)])).view_as(x)


class OneByOne(torch.nn.Module):
    """``layer`` with its local experts run one after another."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        batches = experts_module.expert_batches
        experts_module.expert_batches = lambda tokens, counts: (None, None)
        try:
            return self.layer(x)
        finally:
            experts_module.expert_batches = batches


def step(module, x):
    for param in module.parameters():  # as fairseq's zero_grad: every step writes new gradients
        param.grad = None
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().pow(2).mean().backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--sublayers", type=int, default=3)
    parser.add_argument("--experts", default="1,4,16,64", help="comma-separated local expert counts")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="the model's precision (routing scores are float32 in any case)")
    parser.add_argument("--json", default="runs/bench/layer.json")
    args = parser.parse_args()
    try:
        counts = [int(e) for e in args.experts.split(",")]
    except ValueError:
        parser.error(f"--experts {args.experts!r} is not a comma-separated list of expert counts")

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    modules = {f"E={e}": BaseLayer(args.dim, args.ffn, e, num_sublayers=args.sublayers) for e in counts}
    modules[f"E={counts[-1]}, one by one"] = OneByOne(modules[f"E={counts[-1]}"])
    modules["dense FFN block"] = DenseFeedForward(args.dim, args.ffn, args.sublayers)
    for module in modules.values():
        for p in module.parameters():  # away from the zero-initialised last projection
            torch.nn.init.normal_(p, std=0.02)
        module.to(args.device, dtype).train()
    x = torch.randn(args.tokens, 1, args.dim, device=args.device, dtype=dtype, requires_grad=True)
    times, faults = {name: [] for name in modules}, {name: [] for name in modules}
    for module in modules.values():
        step(module, x)  # warm-up (and kernel build)
    for _ in range(args.repeats):
        for name, module in modules.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start, faults_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            step(module, x)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    page_faults = {name: statistics.median(f) for name, f in faults.items()}
    reference = ms[f"E={counts[0]}"]
    print(f"\nforward+backward, T={args.tokens}, d={args.dim}, ffn={args.ffn}, {args.sublayers} sublayers, "
          f"{args.dtype}, {args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads), median of {args.repeats}, balanced routing")
    print(f"| module | ms | ratio to E={counts[0]} | host page faults per step |\n|---|---|---|---|")
    for name, value in ms.items():
        print(f"| {'BASE layer, ' if name.startswith('E=') else ''}{name} | {value:.1f} | {value / reference:.3f}x | "
              f"{page_faults[name]:,.0f} |")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "machine": platform.platform(), "ms": ms, "page_faults": page_faults,
                   "ratio_to_first": {name: value / reference for name, value in ms.items()}}, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

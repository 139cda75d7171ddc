#!/usr/bin/env python3
"""BASE layer against a dense FFN sublayer of the same per-token FLOPs (forward + backward).

    python scripts/bench_layer.py [--tokens 8192 --dim 512 --ffn 2048 --experts 8] [--device cuda]
                                  [--dtype bf16] [--json ...]

Each token of the BASE layer passes through one expert sublayer (LayerNorm, d->ffn->d), as
each token of the dense sublayer does, so the FLOPs match up to the routing scores (T x E x d).
The difference is routing (the balanced assignment in training), dispatch and combine.
Runs alternate; the table shows medians and the ratio.
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch

from fairseq_base.experts import ExpertSublayer
from fairseq_base.layer import BaseLayer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DenseFeedForward(torch.nn.Module):
    """x + W2 act(W1 LayerNorm(x)): the residual FFN block a dense model has instead."""

    def __init__(self, dim, ffn):
        super().__init__()
        self.ffn = ExpertSublayer(dim, ffn)

    def forward(self, x):
        return x + self.ffn(x)


def step(module, x):
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().pow(2).mean().backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="the model's precision (routing scores are float32 in any case)")
    parser.add_argument("--json", default="runs/bench/layer.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    base = BaseLayer(args.dim, args.ffn, args.experts).train()
    dense = DenseFeedForward(args.dim, args.ffn).train()
    for module in (base, dense):  # away from the zero-initialised last projection
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
        module.to(args.device, dtype)
    x = torch.randn(args.tokens, 1, args.dim, device=args.device, dtype=dtype, requires_grad=True)
    modules = {"base_layer": base, "dense_ffn": dense}
    times = {name: [] for name in modules}
    for name, module in modules.items():
        step(module, x)  # warm-up (and kernel build)
    for _ in range(args.repeats):
        for name, module in modules.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(module, x)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    ratio = ms["base_layer"] / ms["dense_ffn"]
    print(f"\nforward+backward, T={args.tokens}, d={args.dim}, ffn={args.ffn}, E={args.experts}, {args.dtype}, "
          f"{args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"median of {args.repeats}")
    print("| module | ms | ratio to dense |\n|---|---|---|")
    print(f"| BASE layer ({args.experts} experts, balanced routing) | {ms['base_layer']:.1f} | {ratio:.3f}x |")
    print(f"| dense FFN sublayer | {ms['dense_ffn']:.1f} | 1.000x |")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "machine": platform.platform(), "ms": ms, "ratio": ratio}, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

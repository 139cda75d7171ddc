#!/usr/bin/env python3
"""BASE layers on W gloo workers (CPU), forward + backward, without the rest of a model:
fairseq_base against fairseq's built-in BaseLayer and the FFN floor.

    python scripts/bench_layer_workers.py [--workers 2 --tokens 1024 --dim 256 --ffn 1024]
                                          [--repeats 100] [--malloc tuned|default]
                                          [--json runs/bench/layer_workers.json]

- fairseq_base: BaseLayer with W experts (one per worker), shuffled balanced routing
- fairseq built-in: fairseq.modules.base_layer.BaseLayer (libbase), the same sizes
- FFN floor: x + expert(x) on every local token, no routing and no all-to-all: the FLOPs
  that any BASE layer adds to a model
The defaults are the BASE layer of scripts/bench_e2e.py (tokens per worker and step, sizes),
so this shows what its end-to-end numbers contain without the noise of the other layers.
fairseq_base's token-count exchange starts before the timing, as the model starts it when
the decoder starts. --malloc is as in bench_e2e.py. Every iteration starts at a barrier and
counts until the slowest worker is done; the three layers alternate, and the table shows
medians and ratios.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# This repository's package, even if another copy is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_e2e import TUNED_MALLOC  # noqa: E402
from fairseq_base.dispatcher import SizeExchange  # noqa: E402
from fairseq_base.layer import BaseLayer  # noqa: E402
from ffn_floor_train import ffn_only_forward  # noqa: E402


def build_layers(args):
    from fairseq.modules.base_layer import BaseLayer as BuiltinBaseLayer

    ours = BaseLayer(args.dim, args.ffn, args.workers)
    builtin = BuiltinBaseLayer(argparse.Namespace(
        decoder_embed_dim=args.dim, decoder_ffn_embed_dim=args.ffn, base_sublayers=1, base_shuffle=1,
        activation_fn="relu", dropout=0.0, activation_dropout=0.0, quant_noise_pq=0,
        quant_noise_pq_block_size=8, decoder_normalize_before=True))
    for layer in (ours, builtin):  # away from the zero-initialised last projections
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.02)

    def announce_tokens(x):  # transformer_lm_base starts this exchange when the decoder starts
        ours.token_count_exchange = SizeExchange(x.size(0) * x.size(1), x.device)

    # name: (what runs before the layer, outside the timing; the layer)
    return {"fairseq_base": (announce_tokens, lambda x: ours(x)[0]),
            "fairseq_builtin": (None, lambda x: builtin(x)[0]),
            "ffn_floor": (None, lambda x: ffn_only_forward(ours, x)[0])}


def worker(rank, args, rendezvous):
    torch.set_num_threads(max(1, os.cpu_count() // args.workers))
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=args.workers)
    torch.manual_seed(rank)
    layers = build_layers(args)
    x = torch.randn(args.tokens, 1, args.dim, requires_grad=True)
    grad = torch.randn_like(x)
    times = {name: [] for name in layers}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, (before, layer) in layers.items():
            if before is not None:
                before(x)
            dist.barrier()
            start = time.perf_counter()
            layer(x).backward(grad)
            if repeat > 0:
                times[name].append(time.perf_counter() - start)
    everyone = [None] * args.workers
    dist.all_gather_object(everyone, times)
    if rank == 0:
        report(args, {name: [max(worker_times[name][i] for worker_times in everyone)
                             for i in range(args.repeats)] for name in times})
    dist.destroy_process_group()


def report(args, times):
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(f"\nBASE layer forward+backward on {args.workers} gloo workers, {args.tokens} tokens per worker, "
          f"d={args.dim}, ffn={args.ffn}, E={args.workers}, {platform.processor() or platform.machine()} "
          f"({os.cpu_count()} cores), slowest worker per iteration, median of {args.repeats}")
    print("| layer | ms | this / FFN floor | this / fairseq built-in |\n|---|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.2f} | {value / ms['ffn_floor']:.3f}x | {value / ms['fairseq_builtin']:.3f}x |")
    overhead = {name: ms[name] - ms["ffn_floor"] for name in ("fairseq_base", "fairseq_builtin")}
    print(f"\nabove the floor (routing and all-to-all): fairseq_base {overhead['fairseq_base']:.2f} ms, "
          f"fairseq built-in {overhead['fairseq_builtin']:.2f} ms")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "machine": platform.platform(), "ms": ms, "times_s": times}, f, indent=2)
    print(f"\nwrote {args.json}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per worker")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--malloc", choices=["tuned", "default"], default="tuned")
    parser.add_argument("--json", default="runs/bench/layer_workers.json")
    args = parser.parse_args()
    if args.workers < 2:
        parser.error("--workers must be at least 2 (with one worker, use scripts/bench_layer.py)")
    os.environ.pop("GLIBC_TUNABLES", None)  # read by the workers' glibc when they start
    if args.malloc == "tuned":
        os.environ["GLIBC_TUNABLES"] = TUNED_MALLOC
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(args, os.path.join(folder, "rendezvous")), nprocs=args.workers)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""End to end: words/s of fairseq-train on gloo workers (CPU) for four identical trunks, or
for our BASE model under two DDP backends.

    python scripts/bench_e2e.py [--workers 2 --updates 60 --rounds 3 --tokens-per-sample 128]
                                [--malloc tuned|default]
                                [--bind-cores] [--json runs/bench/e2e.json]
    python scripts/bench_e2e.py --ddp --workers 2 4 [--json runs/bench/e2e_ddp.json]

- fairseq_base: --arch transformer_lm_base --base-layers 1 (one expert per worker, E = W)
- fairseq built-in: --arch transformer_lm --base-layers 1 (fairseq's BaseLayer and libbase)
- dense: the same trunk without the BASE layer
- dense + FFN: fairseq_base's model with the BASE layer running one expert's FFN sublayer on
  every token (scripts/ffn_floor_train.py): its FLOPs without routing or all-to-all, the
  lower bound on what any BASE layer costs
All four share the trunk (pre-LayerNorm, d = 256, 4 layers, FFN 1024) and the data (the
Brown corpus, prepared by scripts/prepare_brown.py). Runs alternate over --rounds; words/s
is the median of fairseq's train_inner wps after the first logging interval.

--ddp instead runs fairseq_base's model under --ddp-backend legacy_ddp (one all-reduce
after the backward pass) and c10d (torch's DDP, bucketed all-reduces that overlap the
backward pass; experts are left out of it), alternating, on each --workers count.

--malloc tuned (the default) runs every model with glibc tunables that keep freed memory
in the process. With glibc's defaults, the 32 MB logits buffers are returned to the
system and page-faulted in again, at different times on different workers, and every
collective waits for the unlucky one. --malloc default measures that setting instead.

--bind-cores pins each worker to its own cores, as PyTorch's CPU launcher
(torch.backends.xeon.run_cpu) does, for all four models. Unpinned, the OS moves workers and
their communication threads between cores, which makes one worker late at random; a BASE
model synchronises 7 times per step where a dense one does once, so it pays more for that.
"""

import argparse
import json
import os
import platform
import re
import runpy
import statistics
import subprocess
import sys

SEQUENCES_PER_BATCH = 8
TRUNK = ["--task", "language_modeling", "--sample-break-mode", "none",
         "--batch-size", str(SEQUENCES_PER_BATCH), "--decoder-layers", "4", "--decoder-embed-dim", "256",
         "--decoder-ffn-embed-dim", "1024", "--decoder-attention-heads", "4", "--decoder-input-dim", "256",
         "--decoder-output-dim", "256", "--decoder-normalize-before", "--share-decoder-input-output-embed",
         "--optimizer", "adam", "--lr", "0.001", "--no-save", "--disable-validation", "--cpu",
         "--distributed-backend", "gloo", "--num-workers", "0",
         "--log-format", "simple", "--seed", "1"]
# Keep large freed blocks in the heap (mmap threshold at glibc's 32 MiB maximum) and never trim it.
TUNED_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
FAIRSEQ_TRAIN = os.path.join(os.path.dirname(sys.executable), "fairseq-train")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "fairseq_base")
FFN_FLOOR_TRAIN = os.path.join(REPO, "scripts", "ffn_floor_train.py")
BASE_LAYER = ["--arch", "transformer_lm_base", "--base-layers", "1"]
LEGACY_DDP = ["--ddp-backend", "legacy_ddp"]
# name: (training script, model flags)
MODELS = {
    "fairseq_base": (FAIRSEQ_TRAIN, BASE_LAYER + LEGACY_DDP),
    "fairseq_builtin": (FAIRSEQ_TRAIN, ["--arch", "transformer_lm", "--base-layers", "1"] + LEGACY_DDP),
    "dense": (FAIRSEQ_TRAIN, ["--arch", "transformer_lm_base", "--base-layers", "0"] + LEGACY_DDP),
    "dense_plus_ffn": (FFN_FLOOR_TRAIN, BASE_LAYER + LEGACY_DDP),
}
DDP_BACKENDS = {backend: (FAIRSEQ_TRAIN, BASE_LAYER + ["--ddp-backend", backend]) for backend in ("legacy_ddp", "c10d")}


def run_on_own_cores(train, *train_args):
    """Runs ``train`` (a Python script) on this worker's share of the cores it may use:
    torchrun's LOCAL_RANK r of LOCAL_WORLD_SIZE W gets the r-th of W equal slices."""
    rank, workers = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    cores = sorted(os.sched_getaffinity(0))
    per_worker = max(1, len(cores) // workers)
    first = rank * per_worker % len(cores)
    os.sched_setaffinity(0, cores[first:first + per_worker])
    sys.argv = [train, *train_args]
    runpy.run_path(train, run_name="__main__")


def words_per_second(name, data, workers, updates, tokens_per_sample, train, model_flags, malloc="default",
                     bind_cores=False):
    launch = [os.path.abspath(__file__), "--run-on-own-cores", train] if bind_cores else [train]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(workers),
           *launch, data, "--user-dir", USER_DIR, *TRUNK, "--tokens-per-sample", str(tokens_per_sample), *model_flags,
           "--max-update", str(updates), "--log-interval", str(updates // 6)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, os.cpu_count() // workers)))
    env.pop("GLIBC_TUNABLES", None)
    if malloc == "tuned":
        env["GLIBC_TUNABLES"] = TUNED_MALLOC
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"bench_e2e: {name} ({os.path.basename(train)} {' '.join(model_flags)}) failed:\n"
                 f"{result.stderr[-3000:]}")
    wps = [float(w) for w in re.findall(r"\| train_inner \|.*?wps=([0-9.]+)", result.stdout + result.stderr)]
    return statistics.median(wps[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data-bin/brown")
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--tokens-per-sample", type=int, default=128,
                        help=f"sequence length; each worker's batch holds {SEQUENCES_PER_BATCH} sequences")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                        help="glibc allocator settings for every run (see above)")
    parser.add_argument("--bind-cores", action="store_true",
                        help="pin each worker to its own cores (every model alike; see above)")
    parser.add_argument("--ddp", action="store_true", help="compare DDP backends instead of models (see above)")
    parser.add_argument("--json", default=None, help="default: runs/bench/e2e.json (--ddp: e2e_ddp.json)")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.data, "train.bin")):
        subprocess.run([sys.executable, "scripts/prepare_brown.py", "--out", args.data], check=True)
    models, reference = (DDP_BACKENDS, "legacy_ddp") if args.ddp else (MODELS, "fairseq_base")
    results = {workers: compare(models, reference, workers, args) for workers in args.workers}
    json_path = args.json or f"runs/bench/e2e{'_ddp' if args.ddp else ''}.json"
    os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
    with open(json_path, "w") as f:
        json.dump({"args": vars(args), "machine": platform.platform(), "results_by_workers": results}, f, indent=2)
    print(f"\nwrote {json_path}")


def compare(models, reference, workers, args):
    """Alternating rounds of every model on ``workers`` workers; prints and returns the table."""
    wps = {name: [] for name in models}
    for round_ in range(args.rounds):
        for name in models:
            wps[name].append(words_per_second(name, args.data, workers, args.updates, args.tokens_per_sample,
                                              *models[name], args.malloc, args.bind_cores))
            print(f"| {workers} workers, round {round_ + 1}/{args.rounds}: {name} {wps[name][-1]:,.0f} words/s",
                  flush=True)
    median = {name: statistics.median(v) for name, v in wps.items()}
    # Ratios within each round too: the machine's speed drifts between rounds.
    def ratios(numerator, denominator):
        return {name: [a / b for a, b in zip(numerator(name), denominator(name))] for name in wps}
    if "dense" in models:  # how much faster fairseq_base is, and what each model costs over dense
        columns = {f"{reference} / this": ratios(lambda _: wps[reference], wps.get),
                   "this / dense": ratios(wps.get, lambda _: wps["dense"])}
    else:  # the speed-up of each backend over the reference
        columns = {f"this / {reference}": ratios(wps.get, lambda _: wps[reference])}
    tokens_per_step = SEQUENCES_PER_BATCH * args.tokens_per_sample
    print(f"\nfairseq-train words/s, {workers} gloo workers, {tokens_per_step} tokens per worker and step, "
          f"on {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
          f"{args.malloc} malloc{', cores bound' if args.bind_cores else ''}, "
          f"median of {args.rounds} alternating rounds (per-round ratios: median [min, max])")
    print(f"| {'model' if 'dense' in models else 'DDP backend'} | words/s | " + " | ".join(columns)
          + " |\n|---|---|" + "---|" * len(columns))
    for name, value in median.items():
        print(f"| {name} | {value:,.0f} | " + " | ".join(_ratios(c[name]) for c in columns.values()) + " |")
    return {"words_per_second": wps, "median": median, "per_round": columns}


def _ratios(values):
    return f"{statistics.median(values):.3f}x [{min(values):.3f}, {max(values):.3f}]"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run-on-own-cores"]:
        run_on_own_cores(*sys.argv[2:])
    else:
        main()

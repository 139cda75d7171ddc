#!/usr/bin/env python3
"""One-process training speed as the expert count grows: words/s of fairseq's trainer for the
same model with E = 1, 16 and 64 experts in its BASE layer, and the optimizer's share of a step.

    python scripts/bench_experts_train.py [--experts 1,16,64] [--updates 20] [--rounds 3]
                                          [--json runs/bench/experts_train.json]

Every token passes through one expert whatever E is, so the compute per token does not change;
the parameters do (E experts of 3 sublayers, 4 decoder layers, d = 128, FFN 512, the
small_base model), and with them the optimizer's work (Adam touches every parameter every
step), which no layout of the experts removes. The models alternate over --rounds; each round
runs --updates steps of 16 sequences of 128 tokens (after 2 warm-up steps) and records each
step's time and the time inside the optimizer's step. The table gives medians over all steps.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's fairseq_base, whichever one pip installed
MODEL = ["--task", "language_modeling", "--arch", "transformer_lm_base", "--tokens-per-sample", "128",
         "--sample-break-mode", "none", "--batch-size", "16", "--decoder-layers", "4", "--decoder-embed-dim", "128",
         "--decoder-ffn-embed-dim", "512", "--decoder-attention-heads", "4", "--share-decoder-input-output-embed",
         "--base-layers", "1", "--base-sublayers", "3", "--optimizer", "adam", "--lr", "0.002", "--clip-norm", "0.1",
         "--cpu", "--num-workers", "0", "--seed", "1"]


def build_trainer(data, experts):
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.trainer import Trainer

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data, "--user-dir", os.path.join(REPO, "fairseq_base"), *MODEL,
                                                "--base-experts", str(experts)])
    cfg = checkpoint_utils.convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    batches = trainer.get_train_iterator(epoch=1).next_epoch_itr(shuffle=True)
    optimizer_seconds = []
    step = trainer.optimizer.step

    def timed_step(*args, **kwargs):
        start = time.perf_counter()
        result = step(*args, **kwargs)
        optimizer_seconds.append(time.perf_counter() - start)
        return result

    trainer.optimizer.step = timed_step
    parameters = sum(p.numel() for p in model.parameters())
    return trainer, batches, optimizer_seconds, parameters


def run_steps(trainer, batches, optimizer_seconds, updates):
    """[(step seconds, optimizer seconds, tokens)] of ``updates`` steps."""
    steps = []
    for _ in range(updates):
        sample = next(batches)
        start = time.perf_counter()
        trainer.train_step([sample])
        steps.append((time.perf_counter() - start, optimizer_seconds[-1], sample["ntokens"]))
    return steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(REPO, "data-bin", "brown"))
    parser.add_argument("--experts", default="1,16,64", help="comma-separated expert counts")
    parser.add_argument("--updates", type=int, default=20, help="timed steps per model and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=os.path.join(REPO, "runs", "bench", "experts_train.json"))
    args = parser.parse_args()
    try:
        counts = [int(e) for e in args.experts.split(",")]
    except ValueError:
        parser.error(f"--experts {args.experts!r} is not a comma-separated list of expert counts")
    if not os.path.exists(os.path.join(args.data, "train.bin")):
        subprocess.run([sys.executable, os.path.join(REPO, "scripts", "prepare_brown.py"), "--out", args.data],
                       check=True)
    import torch

    trainers = {e: build_trainer(args.data, e) for e in counts}
    for trainer, batches, optimizer_seconds, _ in trainers.values():
        run_steps(trainer, batches, optimizer_seconds, 2)  # warm-up
    steps = {e: [] for e in counts}
    for round_index in range(args.rounds):
        for e, (trainer, batches, optimizer_seconds, _) in trainers.items():
            steps[e] += run_steps(trainer, batches, optimizer_seconds, args.updates)
        print(f"| round {round_index + 1}/{args.rounds} done", flush=True)

    rows = {}
    for e, measured in steps.items():
        step = statistics.median(s for s, _, _ in measured)
        optimizer = statistics.median(o for _, o, _ in measured)
        rows[e] = {"words_per_second": statistics.median(n / s for s, _, n in measured), "step_ms": 1e3 * step,
                   "optimizer_ms": 1e3 * optimizer, "optimizer_share": optimizer / step,
                   "parameters": trainers[e][3]}
    first = rows[counts[0]]
    print(f"\none process, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds of {args.updates} steps, medians")
    print(f"| experts | parameters | words/s | vs E={counts[0]} | step (ms) | optimizer (ms) | optimizer's share |")
    print("|---|---|---|---|---|---|---|")
    for e, row in rows.items():
        print(f"| {e} | {row['parameters'] / 1e6:.1f}M | {row['words_per_second']:,.0f} | "
              f"{row['words_per_second'] / first['words_per_second']:.3f}x | {row['step_ms']:.1f} | "
              f"{row['optimizer_ms']:.1f} | {row['optimizer_share']:.1%} |")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "machine": platform.platform(), "rows": rows}, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

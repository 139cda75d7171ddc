#!/usr/bin/env python3
"""The paper's language-model comparison at laptop scale: dense, BASE, BASE x 3, BASE Top, and the
routing baselines Switch, top-2 MoE and Hash layers.

    python scripts/reproduce_small.py [--minutes 3] [--out runs/reproduce_small]

Each model trains from its configs/small_*.yaml on the Brown corpus for the same wall-clock
budget on this machine (the paper compares at equal GPUs and time), validating every 50
updates; then fairseq-eval-lm scores it on the test split. Written to --out:
results.md and results.json (the table), valid_ppl.png (validation perplexity against
wall-clock time and against updates, as the paper's figures) and expert_load.png (the share
of validation tokens each expert receives under inference routing, the paper's Figure 8).
``--models`` picks some of them (e.g. --models dense,Switch).
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {"dense": "small_dense", "BASE": "small_base", "BASE x 3": "small_base_x3", "BASE Top": "small_base_top",
          "Switch": "small_switch", "MoE top-2": "small_moe_top2", "Hash": "small_hash"}
DROPPED = re.compile(r"\b\w+_dropped=([0-9.]+)")
STAMP = re.compile(r"^(?:\[)?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


def log_time(line):
    match = STAMP.match(line)
    return datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S") if match else None


def train(config, data, minutes, out):
    save_dir = os.path.join(out, config)
    log_path = os.path.join(out, f"{config}.log")
    cmd = ["fairseq-hydra-train", "--config-dir", os.path.join(REPO, "configs"), "--config-name", config,
           f"task.data={data}", f"checkpoint.save_dir={save_dir}", f"hydra.run.dir={save_dir}/hydra",
           "optimization.max_update=100000", f"optimization.stop_time_hours={minutes / 60}",
           "dataset.validate_interval_updates=50", "checkpoint.save_interval_updates=100000",
           "common.log_interval=25"]
    curve, start, dropped = [], None, 0.0
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # progress lines as they come
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, env=env,
                                                      stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            log.write(line)
            if "train_inner" in line:  # "| train_inner |" (fairseq-train) or "[train_inner]" (Hydra)
                dropped = dropped_share(line)
            if "begin training epoch 1" in line:
                start = log_time(line)
            if "valid on 'valid' subset" in line:
                ppl = float(re.search(r"\| ppl ([0-9.]+)", line).group(1))
                updates = int(re.search(r"\| num_updates (\d+)", line).group(1))
                seconds = (log_time(line) - start).total_seconds()
                curve.append({"updates": updates, "seconds": seconds, "valid_ppl": ppl})
                print(f"|   {config}: update {updates}, {seconds:.0f}s, valid ppl {ppl:.2f}", flush=True)
    if proc.returncode != 0:
        sys.exit(f"reproduce_small: {config} failed; see {log_path}")
    return save_dir, curve, dropped


def dropped_share(line):
    """Mean over expert layers of the share of (token, choice) pairs dropped, from a train_inner line."""
    shares = [float(share) for share in DROPPED.findall(line)]
    return sum(shares) / len(shares) if shares else 0.0


def evaluate(data, save_dir):
    result = subprocess.run(
        ["fairseq-eval-lm", data, "--user-dir", os.path.join(REPO, "fairseq_base"), "--path",
         os.path.join(save_dir, "checkpoint_last.pt"), "--gen-subset", "test", "--tokens-per-sample", "128",
         "--batch-size", "16", "--cpu", "--num-workers", "0"], capture_output=True, text=True, check=True)
    return float(re.search(r"Perplexity: ([0-9.]+)", result.stdout + result.stderr).group(1))


def expert_load(data, save_dir):
    """Per expert layer: share of validation (token, choice) pairs per expert under inference
    routing (greedy for BASE), busiest first."""
    import torch
    from fairseq import checkpoint_utils

    import fairseq_base  # noqa: F401  (registers the model)
    from fairseq_base.layer import BaseLayer

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [os.path.join(save_dir, "checkpoint_last.pt")], arg_overrides={"data": data})
    model = models[0].eval()
    layers = [m for m in model.modules() if isinstance(m, BaseLayer)]
    counts = [torch.zeros(layer.num_experts) for layer in layers]

    def hook(index):
        def record(layer, inputs):
            routing, _ = layer.route(inputs[0].reshape(-1, inputs[0].size(-1)))
            counts[index] += torch.bincount(routing.expert_ids.reshape(-1), minlength=layer.num_experts).float()
        return record

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(hook(i))
    task.load_dataset("valid")
    batches = task.get_batch_iterator(task.dataset("valid"), max_sentences=16).next_epoch_itr(shuffle=False)
    with torch.no_grad():
        for sample in batches:
            model(**sample["net_input"])
    return {layer.name: sorted((c / c.sum()).tolist(), reverse=True) for layer, c in zip(layers, counts)}


def plot(results, out):
    import logging

    import matplotlib
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq leaves the root logger at DEBUG
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        axes[0].plot([p["seconds"] / 60 for p in r["curve"]], [p["valid_ppl"] for p in r["curve"]], label=name)
        axes[1].plot([p["updates"] for p in r["curve"]], [p["valid_ppl"] for p in r["curve"]], label=name)
    for ax, xlabel in zip(axes, ["wall-clock (minutes)", "updates"]):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Small-scale comparison of routers (Brown corpus, 2 CPU cores)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "valid_ppl.png"), dpi=120)

    routed = {n: r for n, r in results.items() if r["expert_load"]}
    columns = min(len(routed), 3)
    rows = -(-len(routed) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(routed):]:
        ax.axis("off")
    for ax, (name, r) in zip(axes.flat, routed.items()):
        loads = r["expert_load"]
        for i, (layer, load) in enumerate(loads.items()):
            ax.bar([x + 0.8 * i / len(loads) for x in range(len(load))], load, width=0.8 / len(loads), label=layer)
        ax.axhline(1 / len(next(iter(loads.values()))), color="k", linestyle="--", linewidth=1, label="balanced")
        ax.set_title(name)
        ax.set_xlabel("expert (busiest first)")
        ax.set_ylabel("share of tokens at inference")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "expert_load.png"), dpi=120)


def write_results(results, minutes, out):
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU"
    lines = [f"Small-scale reproduction: {minutes:g} minutes of training per model on {machine}.", "",
             "| model | config | updates | best valid ppl | test ppl | busiest expert's share at inference "
             "| dropped in training (last log) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        busiest = ", ".join(f"{load[0]:.2f} of 1/{len(load)}" for load in r["expert_load"].values()) or "-"
        lines.append(f"| {name} | {r['config']} | {r['curve'][-1]['updates']} | "
                     f"{min(p['valid_ppl'] for p in r['curve']):.2f} | {r['test_ppl']:.2f} | {busiest} | "
                     f"{r['train_dropped']:.1%} |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"minutes": minutes, "machine": machine, "models": results}, f, indent=2)
    plot(results, out)
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget per model")
    parser.add_argument("--data", default=os.path.join(REPO, "data-bin", "brown"))
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "reproduce_small"))
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    args = parser.parse_args()
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; choose from {', '.join(MODELS)}")
    models = {name: MODELS[name] for name in args.models.split(",")}
    used = [os.path.join(args.out, c) for c in models.values() if os.path.exists(os.path.join(args.out, c))]
    if used:  # fairseq would resume from them, and the curves would not start at update 0
        parser.error(f"--out {args.out} already holds runs ({', '.join(used)}); pass a new --out or remove them")
    os.makedirs(args.out, exist_ok=True)
    if not os.path.exists(os.path.join(args.data, "train.bin")):
        subprocess.run([sys.executable, os.path.join(REPO, "scripts", "prepare_brown.py"), "--out", args.data],
                       check=True)

    results = {}
    for i, (name, config) in enumerate(models.items()):
        print(f"== [{i + 1}/{len(models)}] {name} ({config}), {args.minutes:g} minutes", flush=True)
        save_dir, curve, dropped = train(config, args.data, args.minutes, args.out)
        results[name] = {"config": config, "curve": curve, "test_ppl": evaluate(args.data, save_dir),
                         "train_dropped": dropped,
                         "expert_load": expert_load(args.data, save_dir) if name != "dense" else {}}
        print(f"|   {name}: test perplexity {results[name]['test_ppl']:.2f}", flush=True)

    write_results(results, args.minutes, args.out)
    print(f"\nwrote {args.out}/results.md, results.json, valid_ppl.png, expert_load.png")


if __name__ == "__main__":
    main()

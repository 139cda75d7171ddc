#!/usr/bin/env python3
"""The paper's language-model comparison at laptop scale, with several seeds, and two more.

    python scripts/reproduce_small.py [--minutes 3] [--seeds 3] [--out runs/reproduce_small]
    python scripts/reproduce_small.py --comparison routers --updates 1000 --out runs/reproduce_routers
    python scripts/reproduce_small.py --comparison upcycling --out runs/reproduce_upcycling
    python scripts/reproduce_small.py --models dense,BASE,Hash --experts 1,2,4,8,16   # the expert-count sweep

``--comparison architectures`` (the default): each method in its paper's architecture: dense,
BASE (one BASE layer of 3 sublayers after the middle layer), BASE x 3, BASE Top, and Switch,
top-2 MoE and Hash layers (the FFNs of layers 2 and 4 as expert FFNs). It answers "which
method, as published"; the router and the expert layers change together.
``--comparison routers``: only the router changes: the same expert FFNs at layers 2 and 4
(configs/small_routers.yaml, E = 4), routed by balanced (BASE), sbase, switch, top2, hash
and lossfree (DeepSeek-V3's bias), plus dense. It answers "which router".
``--comparison upcycling``: from one dense start (small_dense, seed 1, --start-updates 400: the
quick run's dense model), --updates 400 more as dense, as upcycled with one BASE layer
(small_base) and as upcycled with expert FFNs (small_routers, BASE's router), each through
fairseq's --finetune-from-model (fairseq_base upcycles the dense state dict; optimizer and
learning-rate schedule start again), against BASE (small_base) trained from scratch for the
whole length. It answers "is upcycling my dense model worth it".

Each model trains from its configs/small_*.yaml on the Brown corpus for the same wall-clock
budget on this machine (the paper compares at equal GPUs and time), once per seed,
validating every 50 updates; then fairseq-eval-lm scores it on the test split. The table
gives each model's mean, standard deviation and range over its seeds at equal wall-clock
(test perplexity) and at equal updates (validation perplexity at the last update every run
reached), and marks the models whose range does not overlap the reference's (BASE, or dense
in a sweep): only those differences exceed the seed-to-seed spread.

``--updates N`` trains every run for N updates instead of a wall-clock budget (equal training
compute; the routers comparison's default is 1,000), and the table compares validation
perplexity at equal updates. ``--parallel K`` runs K trainings at once, each on its own core
(``taskset``, one thread); the default is one per core for --updates, one at a time otherwise.
In the routers comparison, lossfree runs at DeepSeek-V3's rate (1e-3); where a run ends with
its busiest expert above 1.2 / E in training (not balanced within the run), "lossfree (rate
scaled)" runs too, at 10 / N (the bias can then cross the sigmoid's whole range in a tenth of
the run), labelled as such.

Resumable: a finished run's result is kept in --out (``RUN.result.json``) and skipped when the
same command runs again, so a sweep can span days. A run of --updates that did not finish goes on
from its last validation (it saves a checkpoint at each); one with a wall-clock budget starts
again from its beginning. Each run records the commit it ran at. Each run prints a progress
line at every validation: which run, its update, and the time elapsed and left.

``--experts`` runs every routed model of ``--models`` at each expert count (the compute per
token does not change with E: every token goes through one expert per layer, two for top-2).

Written to --out: results.md and results.json (the table), valid_ppl.png (validation
perplexity against wall-clock time and against updates, as the paper's figures, every seed),
expert_load.png (the share of validation tokens each expert receives under inference
routing, the paper's Figure 8, first seed), churn.png (the share of a fixed probe set of
validation tokens whose expert changed since the previous validation, per layer) and, with
--experts, a table per model and E and experts.png (test perplexity at equal wall-clock and
validation perplexity at equal updates against E, mean and range over seeds). ``--redraw``
writes the tables and plots again from --out's results.json, without training.
``--models`` picks some of them (e.g. --models dense,Switch).
"""

import argparse
import concurrent.futures
import datetime
import itertools
import json
import os
import platform
import queue
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import NamedTuple, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # expert_load imports this checkout's fairseq_base, whichever one pip installed
# Per comparison: model -> (config, overrides).
COMPARISONS = {
    "architectures": {"dense": ("small_dense", []), "BASE": ("small_base", []), "BASE x 3": ("small_base_x3", []),
                      "BASE Top": ("small_base_top", []), "Switch": ("small_switch", []),
                      "MoE top-2": ("small_moe_top2", []), "Hash": ("small_hash", [])},
    "routers": {"dense": ("small_dense", []),
                **{name: ("small_routers", [f"model.base_router={router}"]) for name, router in (
                    ("BASE", "balanced"), ("S-BASE", "sbase"), ("Switch", "switch"), ("MoE top-2", "top2"),
                    ("Hash", "hash"), ("lossfree", "lossfree"))}},
    # FROM_DENSE go on from the dense start (START_UPDATES); BASE from scratch trains the whole length.
    "upcycling": {"dense (continued)": ("small_dense", []), "upcycled: BASE layer": ("small_base", []),
                  "upcycled: expert FFNs": ("small_routers", ["model.base_router=balanced"]),
                  "BASE from scratch": ("small_base", [])},
}
DENSE = "small_dense"  # the config without experts
# The upcycling comparison starts from the quick run's dense model: scripts/quickrun.sh trains the
# same model (small_dense, seed 1) for the same 400 updates.
START_UPDATES = 400
FROM_DENSE = ("dense (continued)", "upcycled: BASE layer", "upcycled: expert FFNs")
REFERENCE = {"architectures": "BASE", "routers": "BASE", "upcycling": "dense (continued)"}
DROPPED = re.compile(r"\b\w+_dropped=([0-9.]+)")
LOAD_MAX = re.compile(r"\b\w+_load_max=([0-9.]+)")
CHURN = re.compile(r"\b(\w+)_churn ([0-9.]+)")
LOADED = re.compile(r"Loaded checkpoint .* \(epoch \d+ @ (\d+) updates\)")
SAVED = re.compile(r"Saved checkpoint .* \(epoch \d+ @ (\d+) updates")
STAMP = re.compile(r"^(?:\[)?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")
ROUTERS_UPDATES = 1000  # the routers comparison's default length (--updates)
UPCYCLING_UPDATES = 400  # the upcycling comparison's: as many again as the dense start had
BALANCED_BUSIEST = 1.2  # a busiest expert at most this over the mean counts as balanced
LOSSFREE_SCALED = "lossfree (rate scaled)"


def say(line):
    """Print ``line`` in one write: runs in parallel threads would otherwise interleave a line and
    its newline."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def commit():
    """This checkout's commit, "+changes" when its tracked files differ from it: what a run measured."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def log_time(line):
    match = STAMP.match(line)
    return datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S") if match else None


class Arm(NamedTuple):
    """One model of a comparison, trained once per seed."""
    model: str  # its name in COMPARISONS
    config: str  # configs/CONFIG.yaml
    overrides: list
    experts: Optional[int]  # model.base_experts, where a sweep sets it
    updates: int  # optimization.max_update
    start: Optional[str] = None  # a dense checkpoint it starts from (--finetune-from-model), upcycled


def run_name(arm, seed):
    variant = "".join("-" + override.split("=", 1)[1] for override in arm.overrides)
    return (f"{arm.config}{variant}{f'-e{arm.experts}' if arm.experts else ''}{'-from-dense' if arm.start else ''}"
            f"-seed{seed}")


def train(arm, data, minutes, out, seed, validate_every=50, core=None, progress=""):
    """(save_dir, validation curve, training statistics of the last logged batches). ``minutes`` 0:
    no wall-clock budget (``arm.updates`` ends the run, which saves a checkpoint at every validation
    and continues from the last one if it was stopped); ``core``: run on that core, one thread."""
    name, max_update = run_name(arm, seed), arm.updates
    save_dir = os.path.join(out, name)
    log_path = os.path.join(out, f"{name}.log")
    cmd = ["fairseq-hydra-train", "--config-dir", os.path.join(REPO, "configs"), "--config-name", arm.config,
           f"task.data={data}", f"checkpoint.save_dir={save_dir}", f"hydra.run.dir={save_dir}/hydra",
           f"optimization.max_update={max_update}", f"optimization.stop_time_hours={minutes / 60}",
           f"dataset.validate_interval_updates={validate_every}", "common.log_interval=25", f"common.seed={seed}",
           *arm.overrides] + ([f"model.base_experts={arm.experts}"] if arm.experts else []) + (
               [f"checkpoint.finetune_from_model={arm.start}"] if arm.start else []) + (
               [f"checkpoint.save_interval_updates={validate_every}", "checkpoint.keep_interval_updates=1"]
               if minutes == 0 else ["checkpoint.save_interval_updates=100000"])
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # progress lines as they come
    if core is not None:
        cmd = ["taskset", "-c", str(core)] + cmd
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run = {"curve": [], "start": None, "offset": 0.0, "from": 0, "saved": 0,
           "stats": {"dropped": 0.0, "busiest": None}}

    def read(line, live):
        """Follow one line of fairseq's log; ``live``: from this process, not the log of an earlier one."""
        if "train_inner" in line:  # "| train_inner |" (fairseq-train) or "[train_inner]" (Hydra)
            run["stats"] = training_stats(line)
        saved = SAVED.search(line)
        if saved:
            run["saved"] = int(saved.group(1))
        loaded = LOADED.search(line)
        if loaded:  # continuing a stopped run: its curve goes on from the checkpoint's update
            run["from"] = int(loaded.group(1))
            run["curve"] = [point for point in run["curve"] if point["updates"] <= run["from"]]
            run["offset"], run["start"] = (run["curve"][-1]["seconds"] if run["curve"] else 0.0), None
        if "begin training epoch" in line and run["start"] is None:
            run["start"] = log_time(line)
        if "valid on 'valid' subset" in line:
            ppl = float(re.search(r"\| ppl ([0-9.]+)", line).group(1))
            updates = int(re.search(r"\| num_updates (\d+)", line).group(1))
            seconds = run["offset"] + (log_time(line) - run["start"]).total_seconds()
            run["curve"].append({"updates": updates, "seconds": seconds, "valid_ppl": ppl,
                                 "busiest": run["stats"]["busiest"],
                                 "churn": {layer: float(v) for layer, v in CHURN.findall(line)}})
            if live:
                elapsed = time.monotonic() - began
                done = updates - run["from"]
                left = elapsed * (max_update - updates) / done if minutes == 0 and done > 0 else None
                say(f"| {progress}{name}: update {updates}{f'/{max_update}' if minutes == 0 else ''}, valid ppl "
                    f"{ppl:.2f}, {elapsed / 60:.1f} min" + (f", about {left / 60:.0f} min left" if left else ""))

    if os.path.exists(os.path.join(save_dir, "checkpoint_last.pt")) and os.path.exists(log_path):
        with open(log_path) as earlier:
            for line in earlier:
                read(line, live=False)
    if minutes == 0 and run["saved"] >= max_update:  # stopped after its last save: fairseq would train once more
        return save_dir, run["curve"], run["stats"]
    began = time.monotonic()
    # Line-buffered: a stopped run is read back from this log, which must hold every line it printed.
    with open(log_path, "a", buffering=1) as log, subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, env=env, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            log.write(line)
            read(line, live=True)
    if proc.returncode != 0:
        sys.exit(f"reproduce_small: {name} failed; see {log_path}")
    return save_dir, run["curve"], run["stats"]


def training_stats(line):
    """From a train_inner line, means over expert layers: the share of (token, choice) pairs
    dropped, and the busiest expert's load over the mean (its share of the pairs times E; None
    for dense)."""
    def mean(values):
        return sum(values) / len(values) if values else None

    return {"dropped": mean([float(v) for v in DROPPED.findall(line)]) or 0.0,
            "busiest": mean([float(v) for v in LOAD_MAX.findall(line)])}


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


def spread(values):
    """Mean, standard deviation (0 for one value) and range of ``values``."""
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def separated(a, b):
    """Whether the ranges of two ``spread``s do not overlap (needs two seeds or more on each side)."""
    return min(a["n"], b["n"]) > 1 and (a["max"] < b["min"] or b["max"] < a["min"])


def summarize(results):
    """Per model: its test perplexity at equal wall-clock and its validation perplexity at equal
    updates (the last update at which every run of every model validated; None if there is
    none), each as a ``spread``. Returns that update."""
    runs = [run for r in results.values() for run in r["runs"]]
    common = max(set.intersection(*({p["updates"] for p in run["curve"]} for run in runs)), default=None)
    for r in results.values():
        r["test_ppl"] = spread([run["test_ppl"] for run in r["runs"]])
        r["valid_ppl_at_common_updates"] = common and spread(
            [next(p["valid_ppl"] for p in run["curve"] if p["updates"] == common) for run in r["runs"]])
        r["updates"] = statistics.mean(run["curve"][-1]["updates"] for run in r["runs"])
    return common


def describe(s):
    return f"{s['mean']:.2f} ± {s['std']:.2f} [{s['min']:.2f}, {s['max']:.2f}]" if s else "-"


def versus(r, reference, key="test_ppl"):
    if r is reference:
        return "reference"
    if not r.get(key) or not reference.get(key):
        return "-"
    difference = r[key]["mean"] - reference[key]["mean"]
    if min(r[key]["n"], reference[key]["n"]) < 2:
        return f"{difference:+.2f} (one seed: no spread)"
    beyond = "beyond the spread" if separated(r[key], reference[key]) else "within the spread"
    return f"{difference:+.2f} ({beyond})"


def bands(runs, value):
    """(updates, mean, min, max) of ``value(point)`` over the runs, at the updates every run validated."""
    common = sorted(set.intersection(*({p["updates"] for p in run["curve"] if value(p) is not None}
                                       for run in runs)))
    at = [[next(value(p) for p in run["curve"] if p["updates"] == u) for run in runs] for u in common]
    return common, [statistics.mean(v) for v in at], [min(v) for v in at], [max(v) for v in at]


def plot(results, out, common):
    import logging

    import matplotlib
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq leaves the root logger at DEBUG
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    routed_in_training = {n: r for n, r in results.items() if any(p.get("busiest") for run in r["runs"]
                                                                 for p in run["curve"])}
    fig, axes = plt.subplots(1, 3 if routed_in_training else 2, figsize=(16 if routed_in_training else 11, 4))
    for i, (name, r) in enumerate(results.items()):
        color = colors[i % len(colors)]
        for j, run in enumerate(r["runs"]):
            axes[0].plot([p["seconds"] / 60 for p in run["curve"]], [p["valid_ppl"] for p in run["curve"]],
                         label=name if j == 0 else None, color=color, linewidth=1)
        updates, mean, low, high = bands(r["runs"], lambda p: p["valid_ppl"])
        axes[1].plot(updates, mean, label=name, color=color, linewidth=1.2)
        axes[1].fill_between(updates, low, high, color=color, alpha=0.2, linewidth=0)
        if name in routed_in_training:
            updates, mean, low, high = bands(r["runs"], lambda p: p.get("busiest"))
            axes[2].plot(updates, mean, label=name, color=color, linewidth=1.2)
            axes[2].fill_between(updates, low, high, color=color, alpha=0.2, linewidth=0)
    for ax, xlabel in zip(axes, ["wall-clock (minutes)", "updates"]):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
    axes[0].set_title("one line per seed")
    axes[1].set_title("mean over seeds, band: min to max")
    if routed_in_training:
        axes[2].axhline(BALANCED_BUSIEST, color="k", linestyle="--", linewidth=1, label=f"{BALANCED_BUSIEST} x mean")
        axes[2].set_xlabel("updates")
        axes[2].set_ylabel("busiest expert's load over the mean, training")
        axes[2].set_title("mean over seeds and layers, band: min to max")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Small-scale comparison (Brown corpus, CPU)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "valid_ppl.png"), dpi=120)

    routed = {n: r for n, r in results.items() if r["runs"][0]["expert_load"]}
    if not routed:
        return
    grid(plt, routed, out, "expert_load.png", plot_load)
    grid(plt, routed, out, "churn.png", plot_churn)
    sweep = {key: expert_curves(results, key) for key in ("test_ppl", "valid_ppl_at_common_updates")}
    if sweep["test_ppl"]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        titles = ["equal wall-clock", f"equal updates (update {common}): equal training compute"]
        ylabels = ["test perplexity", "validation perplexity"]
        for ax, (key, curves), title, ylabel in zip(axes, sweep.items(), titles, ylabels):
            for model, points in curves.items():
                ax.errorbar([e for e, _ in points], [p["mean"] for _, p in points], marker="o", capsize=3,
                            label=model, yerr=[[p["mean"] - p["min"] for _, p in points],
                                               [p["max"] - p["mean"] for _, p in points]])
            dense = results.get("dense", {}).get(key)
            if dense:
                ax.axhline(dense["mean"], color="k", linestyle="--", linewidth=1, label="dense")
                ax.axhspan(dense["min"], dense["max"], color="k", alpha=0.1)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("experts per expert layer (E)")
            ax.set_ylabel(f"{ylabel} (mean, range over seeds)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "experts.png"), dpi=120)


def expert_curves(results, key):
    """Per routed model of an ``--experts`` sweep: [(E, its ``key`` spread)], in increasing E."""
    curves = {}
    for r in results.values():
        if r["experts"] and r[key]:
            curves.setdefault(r["model"], []).append((r["experts"], r[key]))
    return {model: sorted(points, key=lambda point: point[0]) for model, points in curves.items()}


def sweep_table(results, common):
    """Markdown lines: test perplexity (and validation perplexity at equal updates) per model and E,
    and whether the largest E differs from the smallest beyond the seed-to-seed spread."""
    test, valid = expert_curves(results, "test_ppl"), expert_curves(results, "valid_ppl_at_common_updates")
    counts = sorted({e for points in test.values() for e, _ in points})
    lines = ["| model | " + " | ".join(f"E={e}" for e in counts) +
             f" | E={counts[-1]} vs E={counts[0]}: test ppl | valid ppl at update {common} |",
             "|---" * (len(counts) + 3) + "|"]
    for model, points in test.items():
        valid_points = valid.get(model, [])
        valid_at = dict(valid_points)
        cells = [f"{t['mean']:.2f} ± {t['std']:.2f}" + (f" ({valid_at[e]['mean']:.2f})" if e in valid_at else "")
                 for e, t in points]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {trend(points)} | {trend(valid_points)} |")
    return ["", f"Expert-count sweep: test perplexity mean ± standard deviation at equal wall-clock (in parentheses: "
            f"validation perplexity at update {common}, equal training compute).", ""] + lines


def trend(points):
    """From the smallest E's mean to the largest's, and whether that exceeds the seed-to-seed spread."""
    if len(points) < 2:
        return "-"
    (_, first), (_, last) = points[0], points[-1]
    beyond = "beyond the spread" if separated(first, last) else "within the spread"
    return f"{last['mean'] - first['mean']:+.2f} ({beyond})"


def grid(plt, results, out, filename, draw):
    columns = min(len(results), 3)
    rows = -(-len(results) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.5 * rows), squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    for ax, (name, r) in zip(axes.flat, results.items()):
        draw(ax, r)
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, filename), dpi=120)


def plot_load(ax, r):
    loads = r["runs"][0]["expert_load"]
    for i, (layer, load) in enumerate(loads.items()):
        ax.bar([x + 0.8 * i / len(loads) for x in range(len(load))], load, width=0.8 / len(loads), label=layer)
    ax.axhline(1 / len(next(iter(loads.values()))), color="k", linestyle="--", linewidth=1, label="balanced")
    ax.set_xlabel("expert (busiest first)")
    ax.set_ylabel("share of tokens at inference")


def plot_churn(ax, r):
    for run_index, run in enumerate(r["runs"]):
        points = [p for p in run["curve"] if p["churn"]]
        for i, layer in enumerate(points[0]["churn"] if points else []):
            ax.plot([p["updates"] for p in points], [p["churn"][layer] for p in points], color=f"C{i}", linewidth=1,
                    marker=".", label=layer if run_index == 0 else None)
    ax.set_xlabel("updates")
    ax.set_ylabel("probe tokens whose expert changed")
    ax.set_ylim(0, 1)


def write_results(results, meta, out):
    """results.md, results.json and the plots in ``out``; ``meta``: minutes, seeds, machine and command."""
    common = summarize(results)
    sweep = any(r["experts"] for r in results.values())
    comparison = meta.get("comparison", "architectures")
    reference = results.get("dense" if sweep else REFERENCE[comparison]) or next(iter(results.values()))
    title = {"architectures": "Small-scale reproduction (each method in its paper's architecture)",
             "routers": "Router comparison (only the router changes: the expert FFNs of configs/small_routers.yaml)",
             "upcycling": "Upcycling (from a dense model: continued dense, upcycled, against BASE from scratch)"}
    budget = f"{meta['updates']} updates per run" if meta.get("updates") else \
        f"{meta['minutes']:g} minutes of training per run"
    if comparison == "upcycling":
        budget = (f"a dense start ({DENSE}, seed 1, {meta['start_updates']} updates, as scripts/quickrun.sh's dense "
                  f"model) continued for {meta['updates']} updates per run (fairseq's --finetune-from-model: "
                  f"optimizer and learning-rate schedule start again), BASE from scratch for "
                  f"{meta['start_updates'] + meta['updates']}")
    key = "valid_ppl_at_common_updates" if meta.get("updates") else "test_ppl"
    commits = {run["commit"] for r in results.values() for run in r["runs"] if run.get("commit")}
    test_at = "after the last update" if meta.get("updates") else "equal wall-clock"
    lines = [f"{title[comparison]}: {budget}, "
             f"{meta['seeds']} seed(s) per model, on {meta['machine']}.",
             f"Command: `{' '.join(['python', 'scripts/reproduce_small.py'] + meta['command'])}`" + (
                 f", at commit {', '.join(sorted(commits))}" if commits else ""),
             "", f"Perplexities: mean ± standard deviation [min, max] over seeds. Validation at equal updates: at "
             f"update {common}, the last every run reached. \"vs {reference['label']}\": "
             f"{'validation perplexity difference at that update' if key != 'test_ppl' else 'test perplexity difference'}; "
             "beyond the spread where the two ranges do not overlap. Busiest expert: its share of the tokens, per "
             "expert layer, against 1/E for perfect balance (in training: the last logged batches, mean over seeds "
             "and layers). Churn: the share of a fixed probe of validation tokens whose expert changed since the "
             "previous validation (the last one, mean over seeds and layers).", "",
             f"| model | config | seeds | updates (mean) | test ppl ({test_at}) | valid ppl at update {common} "
             f"| vs {reference['label']} | busiest expert in training | busiest expert at inference (first seed) "
             f"| churn | dropped in training |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        first = r["runs"][0]
        loads = list(first["expert_load"].values())
        busiest = ", ".join(f"{load[0]:.2f} of 1/{len(load)}" for load in loads) or "-"
        dropped = statistics.mean(run["train_dropped"] for run in r["runs"])
        in_training = [run.get("train_busiest") for run in r["runs"] if run.get("train_busiest") is not None]
        in_training = f"{statistics.mean(in_training) / len(loads[0]):.2f} of 1/{len(loads[0])}" if (
            in_training and loads) else "-"
        churn = [statistics.mean(run["curve"][-1]["churn"].values()) for run in r["runs"] if run["curve"][-1]["churn"]]
        churn = f"{statistics.mean(churn):.3f}" if churn else "-"
        lines.append(f"| {name} | {r['config']} | {len(r['runs'])} | {r['updates']:.0f} | {describe(r['test_ppl'])} | "
                     f"{describe(r['valid_ppl_at_common_updates'])} | {versus(r, reference, key)} | {in_training} | "
                     f"{busiest} | {churn} | {dropped:.1%} |")
    pairs = [f"{a} {ra[key]['mean'] - rb[key]['mean']:+.2f} against {b}"
             for (a, ra), (b, rb) in itertools.combinations(results.items(), 2)
             if ra.get(key) and rb.get(key) and separated(ra[key], rb[key])]
    what = f"validation perplexity at update {common}" if key != "test_ppl" else "test perplexity"
    lines += ["", f"Every pair whose {what} differs beyond the seed spread (ranges that do not overlap): "
              + ("; ".join(pairs) or "none") + "."]
    if sweep:
        lines += sweep_table(results, common)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(meta, common_updates=common, models=results), f, indent=2)
    plot(results, out, common)
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget per run")
    parser.add_argument("--seeds", type=int, default=3, help="runs per model, with seeds 1..N")
    parser.add_argument("--data", default=os.path.join(REPO, "data-bin", "brown"))
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "reproduce_small"))
    parser.add_argument("--comparison", choices=sorted(COMPARISONS), default="architectures",
                        help="architectures: each method as its paper built it; routers: only the router changes; "
                             "upcycling: a dense model continued, dense or upcycled, against BASE from scratch")
    parser.add_argument("--models", default="", help="comma-separated (default: all of the comparison's), from: " +
                        "; ".join(f"{c}: {', '.join(models)}" for c, models in COMPARISONS.items()))
    parser.add_argument("--experts", default="", help="comma-separated expert counts: run every routed model at each")
    parser.add_argument("--validate-every", type=int, default=50, help="validation interval in updates")
    parser.add_argument("--max-update", type=int, default=100000,
                        help="also stop a run after this many updates (a quick smoke run: --minutes 1 --max-update 3)")
    parser.add_argument("--updates", type=int, default=None,
                        help=f"train every run for this many updates, with no time budget (the routers comparison's "
                             f"default: {ROUTERS_UPDATES}; upcycling's: {UPCYCLING_UPDATES}, after the dense start; "
                             f"--updates 0: the wall-clock budget of --minutes)")
    parser.add_argument("--start-updates", type=int, default=START_UPDATES,
                        help=f"upcycling: the dense start's updates (default {START_UPDATES}, as the quick run's)")
    parser.add_argument("--parallel", type=int, default=None,
                        help="trainings at once, each on its own core (default: one per core with --updates, else 1)")
    parser.add_argument("--redraw", action="store_true",
                        help="write the tables and plots again from --out's results.json, without training")
    args = parser.parse_args()
    if args.redraw:
        try:
            with open(os.path.join(args.out, "results.json")) as f:
                saved = json.load(f)
        except (OSError, ValueError) as err:
            parser.error(f"--redraw reads --out's results.json: {err}")
        kept = ("minutes", "seeds", "machine", "command", "comparison", "updates", "start_updates")
        write_results(saved.pop("models"), {key: saved[key] for key in kept if key in saved}, args.out)
        return
    # Hydra runs each training in its own working directory.
    args.out, args.data = os.path.abspath(args.out), os.path.abspath(args.data)
    models = COMPARISONS[args.comparison]
    args.models = args.models or ",".join(models)
    unknown = set(args.models.split(",")) - set(models)
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)} for --comparison {args.comparison}; choose from "
                     f"{', '.join(models)}")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    try:
        experts = [int(e) for e in args.experts.split(",")] if args.experts else []
    except ValueError:
        parser.error(f"--experts {args.experts!r} is not a comma-separated list of expert counts")
    if any(e < 1 for e in experts) or ("MoE top-2" in args.models.split(",") and 1 in experts):
        parser.error(f"--experts {args.experts}: counts must be >= 1 (>= 2 for MoE top-2)")
    if experts and args.comparison == "upcycling":
        parser.error("--experts: the upcycling comparison keeps its configs' expert counts; leave --experts out")
    if args.updates is None:
        args.updates = {"routers": ROUTERS_UPDATES if not experts else 0, "upcycling": UPCYCLING_UPDATES}.get(
            args.comparison, 0)
    if args.updates < 0 or (args.comparison == "upcycling" and args.updates == 0):
        parser.error(f"--updates must be >= {1 if args.comparison == 'upcycling' else 0}, got {args.updates}")
    if args.start_updates < 1:
        parser.error(f"--start-updates must be >= 1, got {args.start_updates}")
    minutes, max_update = (0, args.updates) if args.updates else (args.minutes, args.max_update)
    plan = {}  # label -> Arm
    for name in args.models.split(","):
        for count in experts if experts and name != "dense" else [None]:
            plan[name if count is None else f"{name} E={count}"] = Arm(name, *models[name], count, max_update)
    cores = sorted(os.sched_getaffinity(0))
    args.parallel = args.parallel or (len(cores) if args.updates else 1)
    if not 1 <= args.parallel <= len(cores):
        parser.error(f"--parallel must be between 1 and this machine's {len(cores)} cores, got {args.parallel}")
    os.makedirs(args.out, exist_ok=True)
    if not os.path.exists(os.path.join(args.data, "train.bin")):
        subprocess.run([sys.executable, os.path.join(REPO, "scripts", "prepare_brown.py"), "--out", args.data],
                       check=True)

    # Build the balanced-assignment kernel now: its first build on a machine (about 30 s) would
    # otherwise come out of the first BASE run's training budget.
    import torch
    from fairseq_base.assignment import balanced_assignment
    balanced_assignment(torch.randn(4, 2))

    if args.comparison == "upcycling":
        results = run_upcycling(plan, args, cores)
    else:
        results = run_plan(plan, args, minutes, cores)
    lossfree = results.get("lossfree")
    if args.updates and lossfree and "lossfree" in args.models.split(",") and any(
            (run.get("train_busiest") or 0) > BALANCED_BUSIEST for run in lossfree["runs"]):
        rate = 10 / args.updates
        print(f"| lossfree at DeepSeek-V3's rate did not balance within {args.updates} updates (busiest expert above "
              f"{BALANCED_BUSIEST} x the mean): {LOSSFREE_SCALED}, at {rate:g}", flush=True)
        config, overrides = COMPARISONS[args.comparison]["lossfree"]
        scaled = Arm("lossfree", config, [*overrides, f"model.base_bias_update_rate={rate}"], None, max_update)
        results.update(run_plan({LOSSFREE_SCALED: scaled}, args, minutes, cores))

    machine = f"{platform.processor() or platform.machine()}, {len(cores)} of {os.cpu_count()} cores, no GPU" + (
        f", {args.parallel} runs at once, one core each" if args.parallel > 1 else "")
    write_results(results, {"minutes": args.minutes, "seeds": args.seeds, "machine": machine, "updates": args.updates,
                            "command": sys.argv[1:], "comparison": args.comparison,
                            **({"start_updates": args.start_updates} if args.comparison == "upcycling" else {})},
                  args.out)
    print(f"\nwrote {args.out}/results.md, results.json and plots")


def run_upcycling(plan, args, cores):
    """The dense start (one run, seed 1), then every model of ``plan`` per seed: those of FROM_DENSE
    start from the dense start's checkpoint for ``args.updates`` more updates (their curves begin
    with the start's and go on from its last update); the others train the whole length."""
    start_arm = Arm("dense", DENSE, [], None, args.start_updates)
    start, = run_plan({"dense start": start_arm}, args, 0, cores, seeds=1)["dense start"]["runs"]
    checkpoint = os.path.join(args.out, run_name(start_arm, 1), "checkpoint_last.pt")
    plan = {label: arm._replace(start=checkpoint) if label in FROM_DENSE else
            arm._replace(updates=args.start_updates + args.updates) for label, arm in plan.items()}
    results = run_plan(plan, args, 0, cores)
    began = start["curve"][-1]
    for label, r in results.items():
        if plan[label].start:
            for run in r["runs"]:
                run["curve"] = start["curve"] + [dict(p, updates=p["updates"] + began["updates"],
                                                      seconds=p["seconds"] + began["seconds"]) for p in run["curve"]]
    return results


def run_plan(plan, args, minutes, cores, seeds=None):
    """Train and score every (label, seed) of ``plan`` (seeds 1..``seeds``, default --seeds) not
    already done in --out, ``args.parallel`` at a time; returns the results per label, the kept
    ones included."""
    results = {label: {"label": label, "model": arm.model, "experts": arm.experts, "runs": [], "config": " ".join(
        [arm.config, *arm.overrides] + (["from the dense start"] if arm.start else []))} for label, arm in plan.items()}
    runs = [(label, seed) for seed in range(1, (seeds or args.seeds) + 1) for label in plan]  # seeds outermost
    done, todo = {}, []
    for label, seed in runs:
        name = run_name(plan[label], seed)
        try:
            with open(os.path.join(args.out, f"{name}.result.json")) as f:
                done[label, seed] = json.load(f)
            trained = done[label, seed]["curve"][-1]["updates"] if done[label, seed]["curve"] else None
            if minutes == 0 and trained != plan[label].updates:
                sys.exit(f"reproduce_small: --out {args.out} holds {name} trained for {trained} updates, and this "
                         f"command asks for {plan[label].updates}: pass another --out")
            print(f"| kept: {label}, seed {seed} (finished before: {name}.result.json)", flush=True)
        except (OSError, ValueError):
            if minutes == 0 and os.path.exists(os.path.join(args.out, name, "checkpoint_last.pt")):
                print(f"| {label}, seed {seed} did not finish before: continuing from its last checkpoint",
                      flush=True)
            elif os.path.exists(os.path.join(args.out, name)):  # a time budget would start again mid-curve
                print(f"| {label}, seed {seed} did not finish before: starting it again", flush=True)
                shutil.rmtree(os.path.join(args.out, name))
            todo.append((label, seed))
    todo.sort(key=lambda run: -plan[run[0]].updates)  # the longest first: the last to finish are short
    free_cores = queue.Queue()
    for core in cores[:args.parallel]:
        free_cores.put(core)

    def one_run(index, label, seed):
        arm = plan[label]
        core = free_cores.get()
        try:
            progress = f"[{index}/{len(todo)}] "
            budget = f"{arm.updates} updates" if minutes == 0 else f"{minutes:g} minutes"
            say(f"== {progress}{label} ({results[label]['config']}), seed {seed}, {budget}"
                f"{f', core {core}' if args.parallel > 1 else ''}")
            save_dir, curve, stats = train(arm, args.data, minutes, args.out, seed, args.validate_every,
                                           core if args.parallel > 1 else None, progress)
        finally:
            free_cores.put(core)
        run = {"seed": seed, "commit": commit(), "curve": curve, "test_ppl": evaluate(args.data, save_dir),
               "train_dropped": stats["dropped"], "train_busiest": stats["busiest"],
               "expert_load": expert_load(args.data, save_dir) if arm.config != DENSE else {}}
        with open(os.path.join(args.out, f"{run_name(arm, seed)}.result.json"), "w") as f:
            json.dump(run, f)
        say(f"|   {label}, seed {seed}: test perplexity {run['test_ppl']:.2f}")
        return run

    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = {(label, seed): pool.submit(one_run, i + 1, label, seed) for i, (label, seed) in enumerate(todo)}
        done.update({key: future.result() for key, future in futures.items()})
    for label, seed in runs:
        results[label]["runs"].append(done[label, seed])
    return results


if __name__ == "__main__":
    main()

"""The comparison's tables: results.md, results.json and the plots, from every run's result."""

import itertools
import json
import os
import statistics

from reproduce.comparisons import DENSE, REFERENCE
from reproduce.plots import plot
from reproduce.stats import expert_curves, separated, summarize, trend


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

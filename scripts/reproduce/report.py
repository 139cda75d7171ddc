"""The comparison's tables: results.md, results.json and the plots, from every run's result."""

import itertools
import json
import os
import statistics

from reproduce.comparisons import DENSE, REFERENCE
from reproduce.plots import plot
from reproduce.stats import describe_difference, expert_curves, is_real, paired, summarize, trend


def describe(s):
    return f"{s['mean']:.2f} ± {s['std']:.2f} [{s['min']:.2f}, {s['max']:.2f}]" if s else "-"


def versus(r, reference, key="test_ppl"):
    """``r``'s ``key`` against the reference's, seed by seed (``stats.paired``), in words."""
    if r is reference:
        return "reference"
    return describe_difference(paired(r["runs"], reference["runs"], key))


def balanced_against_greedy(r):
    """BASE's family: the test perplexity with balanced evaluation routing against greedy, seed by seed."""
    balanced = [{"seed": run["seed"], "ppl": run.get("test_ppl_balanced")} for run in r["runs"]]
    greedy = [{"seed": run["seed"], "ppl": run["test_ppl"]} for run in r["runs"]]
    return paired(balanced, greedy, "ppl")


def mean_of(runs, value):
    values = [value(run) for run in runs]
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def routing_in(run, phase, statistic):
    """A run's last logged ``statistic`` (mean over its expert layers) in ``phase`` (train or valid)."""
    return (run.get("routing") or {}).get(phase, {}).get(statistic)


def sweep_table(results, common):
    """Markdown lines: test perplexity (and validation perplexity at equal updates) per model and E,
    and the largest E against the smallest, seed by seed."""
    curves = expert_curves(results)
    counts = sorted({e for points in curves.values() for e, _ in points})
    lines = ["| model | " + " | ".join(f"E={e}" for e in counts) +
             f" | E={counts[-1]} vs E={counts[0]}: test ppl | valid ppl at update {common} |",
             "|---" * (len(counts) + 3) + "|"]
    for model, points in curves.items():
        cells = [f"{r['test_ppl']['mean']:.2f} ± {r['test_ppl']['std']:.2f}" + (
            f" ({r['valid_ppl_at_common_updates']['mean']:.2f})" if r.get("valid_ppl_at_common_updates") else "")
            for _, r in points]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {describe_difference(trend(points, 'test_ppl'))} | "
                     f"{describe_difference(trend(points, 'valid_ppl_at_common_updates'))} |")
    return ["", f"Expert-count sweep: test perplexity mean ± standard deviation (in parentheses: validation "
            f"perplexity at update {common}, equal training compute); the largest E against the smallest: mean "
            f"difference over seeds [95% interval].", ""] + lines


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
                  f"model) continued for {meta['updates']} updates per run, as it is or upcycled by "
                  f"fairseq-base-upcycle (--continue-once: the dense run's data order, learning-rate schedule and "
                  f"optimizer state go on), BASE from scratch for {meta['start_updates'] + meta['updates']}")
    key = "valid_ppl_at_common_updates" if meta.get("updates") else "test_ppl"
    commits = {run["commit"] for r in results.values() for run in r["runs"] if run.get("commit")}
    test_at = "after the last update" if meta.get("updates") else "equal wall-clock"
    other = "test_ppl" if key != "test_ppl" else None
    lines = [f"{title[comparison]}: {budget}, "
             f"{meta['seeds']} seed(s) per model, on {meta['machine']}.",
             f"Command: `{' '.join(['python', 'scripts/reproduce_small.py'] + meta['command'])}`" + (
                 f", at commit {', '.join(sorted(commits))}" if commits else ""),
             "", f"Each seed trains every model on the same data order from the same trunk initialisation. "
             f"Perplexities: mean ± standard deviation [min, max] over seeds. Validation at equal updates: at "
             f"update {common}, the last every run reached. \"vs {reference['label']}\": the difference to "
             f"{reference['label']} seed by seed, its mean [95% interval, Student's t over the seeds]; \"real\" "
             "where the interval excludes 0. Balanced routing: BASE's family scored with --base-eval-routing "
             "balanced (the routing it trains with) instead of greedy. Busiest expert: its share of the tokens, per "
             "expert layer, against 1/E for perfect balance (in training: the last logged batches, mean over seeds "
             "and layers). Top-1 and entropy: at the last validation (inference routing), the share of tokens "
             "whose update comes from their top-1 expert and the mean entropy (nats) of softmax(scores). Churn: "
             "the share of a fixed probe of validation tokens whose expert changed since the previous validation "
             "(the last one, mean over seeds and layers).", "",
             f"| model | config | seeds | test ppl ({test_at}) | valid ppl at update {common} "
             f"| vs {reference['label']}: {'valid' if key != 'test_ppl' else 'test'} ppl "
             + (f"| vs {reference['label']}: test ppl " if other else "") +
             "| test ppl, balanced routing (vs greedy) | busiest expert in training "
             "| busiest expert at inference (first seed) | top-1 | entropy | churn | dropped in training |",
             "|---" * (12 + bool(other)) + "|"]
    for name, r in results.items():
        first = r["runs"][0]
        loads = list(first["expert_load"].values())
        busiest = ", ".join(f"{load[0]:.2f} of 1/{len(load)}" for load in loads) or "-"
        dropped = mean_of(r["runs"], lambda run: run.get("train_dropped")) or 0.0
        in_training = mean_of(r["runs"], lambda run: run.get("train_busiest"))
        in_training = f"{in_training / len(loads[0]):.2f} of 1/{len(loads[0])}" if in_training and loads else "-"
        churn = mean_of(r["runs"], lambda run: statistics.mean(run["curve"][-1]["churn"].values())
                        if run["curve"][-1]["churn"] else None)
        top1, entropy = (mean_of(r["runs"], lambda run: routing_in(run, "valid", s)) for s in ("top1", "entropy"))
        balanced = "-" if not r.get("test_ppl_balanced") else \
            f"{describe(r['test_ppl_balanced'])} ({describe_difference(balanced_against_greedy(r))})"
        lines.append(f"| {name} | {r['config']} | {len(r['runs'])} | {describe(r['test_ppl'])} | "
                     f"{describe(r['valid_ppl_at_common_updates'])} | {versus(r, reference, key)} | "
                     + (f"{versus(r, reference, other)} | " if other else "") +
                     f"{balanced} | {in_training} | {busiest} | "
                     f"{'-' if top1 is None else f'{top1:.3f}'} | {'-' if entropy is None else f'{entropy:.3f}'} | "
                     f"{'-' if churn is None else f'{churn:.3f}'} | {dropped:.1%} |")
    seeds = sorted({run["seed"] for r in results.values() for run in r["runs"]})
    what = f"validation perplexity at update {common}" if key != "test_ppl" else "test perplexity"
    lines += ["", f"Per seed, {what} minus {reference['label']}'s:", "",
              "| model | " + " | ".join(f"seed {seed}" for seed in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for name, r in results.items():
        difference = paired(r["runs"], reference["runs"], key) if r is not reference else None
        per_seed = difference["per_seed"] if difference else {}
        lines.append(f"| {name} | " + " | ".join(f"{per_seed[seed]:+.2f}" if seed in per_seed else "-"
                                                  for seed in seeds) + " |")
    pairs = [f"{a} {describe_difference(difference)} against {b}"
             for (a, ra), (b, rb) in itertools.combinations(results.items(), 2)
             for difference in [paired(ra["runs"], rb["runs"], key)] if is_real(difference)]
    lines += ["", f"Every pair whose {what} differs for real (the 95% interval of the seed-by-seed difference "
              f"excludes 0): " + ("; ".join(pairs) or "none") + "."]
    if sweep:
        lines += sweep_table(results, common)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(meta, common_updates=common, models=results), f, indent=2)
    plot(results, out, common)
    print("\n".join(lines))

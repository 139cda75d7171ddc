"""The comparison's figures: validation perplexity (against wall-clock time and updates), the
busiest expert's load in training, expert loads at inference, routing churn, and an expert-count
sweep."""

import os

from reproduce.comparisons import BALANCED_BUSIEST
from reproduce.stats import bands, expert_curves


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
    curves = expert_curves(results)
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        titles = ["test perplexity", f"equal updates (update {common}): equal training compute"]
        ylabels = ["test perplexity", "validation perplexity"]
        for ax, key, title, ylabel in zip(axes, ("test_ppl", "valid_ppl_at_common_updates"), titles, ylabels):
            for model, points in curves.items():
                points = [(e, r[key]) for e, r in points if r.get(key)]
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

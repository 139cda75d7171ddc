"""Statistics over seeds: each model's spread, whether two spreads separate, the curves of an
expert-count sweep."""

import statistics


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


def bands(runs, value):
    """(updates, mean, min, max) of ``value(point)`` over the runs, at the updates every run validated."""
    common = sorted(set.intersection(*({p["updates"] for p in run["curve"] if value(p) is not None}
                                       for run in runs)))
    at = [[next(value(p) for p in run["curve"] if p["updates"] == u) for run in runs] for u in common]
    return common, [statistics.mean(v) for v in at], [min(v) for v in at], [max(v) for v in at]


def expert_curves(results, key):
    """Per routed model of an ``--experts`` sweep: [(E, its ``key`` spread)], in increasing E."""
    curves = {}
    for r in results.values():
        if r["experts"] and r[key]:
            curves.setdefault(r["model"], []).append((r["experts"], r[key]))
    return {model: sorted(points, key=lambda point: point[0]) for model, points in curves.items()}


def trend(points):
    """From the smallest E's mean to the largest's, and whether that exceeds the seed-to-seed spread."""
    if len(points) < 2:
        return "-"
    (_, first), (_, last) = points[0], points[-1]
    beyond = "beyond the spread" if separated(first, last) else "within the spread"
    return f"{last['mean'] - first['mean']:+.2f} ({beyond})"

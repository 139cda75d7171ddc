"""Statistics over seeds. Every model of a comparison trains once per seed, and a seed fixes the
data order and the trunk's initial weights for every model alike (fairseq's --seed; the expert
layers draw theirs after the trunk), so two models are compared seed by seed: the difference of
each seed's pair, their mean, and its 95% interval (Student's t over the seeds). A difference is
real where that interval excludes 0. Each model's spread (mean, standard deviation, range) is
kept beside it."""

import math
import statistics

# Two-sided 95% quantiles of Student's t, t(0.975; df), for df = 1..30 (the standard table).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.959964


def t95(df: int) -> float:
    """t(0.975; df): the table, and beyond it the Cornish-Fisher expansion about the normal quantile."""
    if df <= len(T95):
        return T95[df - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def spread(values):
    """Mean, standard deviation (0 for one value) and range of ``values``."""
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def paired(runs, reference_runs, key):
    """``run[key]`` of ``runs`` minus the reference's, seed by seed (the seeds both ran): the
    differences per seed, their mean and its 95% interval (None with one seed); None if no seed
    has both values."""
    mine = {run["seed"]: run.get(key) for run in runs}
    theirs = {run["seed"]: run.get(key) for run in reference_runs}
    per_seed = {seed: mine[seed] - theirs[seed] for seed in sorted(set(mine) & set(theirs))
                if mine[seed] is not None and theirs[seed] is not None}
    if not per_seed:
        return None
    values, n = list(per_seed.values()), len(per_seed)
    mean = statistics.mean(values)
    half = t95(n - 1) * statistics.stdev(values) / math.sqrt(n) if n > 1 else None
    return {"n": n, "mean": mean, "low": None if half is None else mean - half,
            "high": None if half is None else mean + half, "per_seed": per_seed}


def is_real(difference) -> bool:
    """Whether a ``paired`` difference's 95% interval excludes 0."""
    return bool(difference) and difference["low"] is not None and (difference["low"] > 0 or difference["high"] < 0)


def describe_difference(difference) -> str:
    if not difference:
        return "-"
    if difference["low"] is None:
        return f"{difference['mean']:+.2f} (one seed: no interval)"
    verdict = "real" if is_real(difference) else "not separated"
    return f"{difference['mean']:+.2f} [{difference['low']:+.2f}, {difference['high']:+.2f}], {verdict}"


def summarize(results):
    """Per run: its validation perplexity at equal updates (the last update at which every run of
    every model validated; None if there is none). Per model: the spreads of that, of the test
    perplexity and (BASE's family) of the test perplexity with balanced evaluation routing.
    Returns that update."""
    runs = [run for r in results.values() for run in r["runs"]]
    common = max(set.intersection(*({p["updates"] for p in run["curve"]} for run in runs)), default=None)
    for r in results.values():
        for run in r["runs"]:
            run["valid_ppl_at_common_updates"] = common and next(
                p["valid_ppl"] for p in run["curve"] if p["updates"] == common)
        for key in ("test_ppl", "valid_ppl_at_common_updates", "test_ppl_balanced"):
            values = [run.get(key) for run in r["runs"] if run.get(key) is not None]
            r[key] = spread(values) if values else None
        r["updates"] = statistics.mean(run["curve"][-1]["updates"] for run in r["runs"])
    return common


def bands(runs, value):
    """(updates, mean, min, max) of ``value(point)`` over the runs, at the updates every run validated."""
    common = sorted(set.intersection(*({p["updates"] for p in run["curve"] if value(p) is not None}
                                       for run in runs)))
    at = [[next(value(p) for p in run["curve"] if p["updates"] == u) for run in runs] for u in common]
    return common, [statistics.mean(v) for v in at], [min(v) for v in at], [max(v) for v in at]


def expert_curves(results):
    """Per routed model of an ``--experts`` sweep: [(E, its results)], in increasing E."""
    curves = {}
    for r in results.values():
        if r["experts"]:
            curves.setdefault(r["model"], []).append((r["experts"], r))
    return {model: sorted(points, key=lambda point: point[0]) for model, points in curves.items()}


def trend(points, key):
    """The largest E's ``key`` against the smallest E's, seed by seed (``paired``)."""
    if len(points) < 2:
        return None
    return paired(points[-1][1]["runs"], points[0][1]["runs"], key)

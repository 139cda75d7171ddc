#!/usr/bin/env python3
"""The paper's language-model comparison at laptop scale, with several seeds, and two more.

    python scripts/reproduce_small.py [--minutes 3] [--seeds 5] [--out runs/reproduce_small]
    python scripts/reproduce_small.py --comparison routers --updates 1000 --out runs/reproduce_routers
    python scripts/reproduce_small.py --comparison upcycling --out runs/reproduce_upcycling
    python scripts/reproduce_small.py --models dense,BASE,Hash --experts 1,2,4,8,16   # the expert-count sweep

``--comparison architectures`` (the default): each method in its paper's architecture: dense,
BASE (one BASE layer of 3 sublayers after the middle layer), BASE x 3, BASE Top, and Switch,
top-2 MoE and Hash layers (the FFNs of layers 2 and 4 as expert FFNs). It answers "which
method, as published"; the router and the expert layers change together.
``--comparison routers``: only the router changes: the same expert FFNs at layers 2 and 4
(configs/small_routers.yaml, E = 4), routed by balanced (BASE), sbase, switch, top2, hash
and lossfree (DeepSeek-V3's bias), plus dense. It answers "which router". Its ablation arms
("BASE (gate 1)", "Switch (gate 1)", "MoE top-2 (gate 1)": --base-gate one) weigh every token's
update 1 whatever the router, so that the routers differ in their choices alone.
``--comparison upcycling``: from one dense start (small_dense, seed 1, --start-updates 400: the
quick run's dense model), --updates 400 more as dense, as upcycled with expert FFNs (the main
arm: small_routers, BASE's router, each expert a copy of the FFN it replaces) and as upcycled
with one BASE layer (small_base, a new layer that starts as the identity), against BASE
(small_base) trained from scratch for the whole length. The upcycled models are written by
fairseq-base-upcycle (their new weights drawn with the seed) and go on with --continue-once from
the dense run's place: its data order, learning-rate schedule and Adam state, nothing started
again. It answers "is upcycling my dense model worth it".

Each model trains from its configs/small_*.yaml on the Brown corpus for the same wall-clock
budget on this machine (the paper compares at equal GPUs and time), once per seed,
validating every 50 updates; then fairseq-eval-lm scores it on the test split (BASE's family
also with balanced evaluation routing, the routing it trains with). A seed fixes the data
order and the trunk's initial weights of every model alike, so the table compares each model
with the reference (BASE, or dense in a sweep) seed by seed: the mean of the per-seed
differences with its 95% interval (Student's t over the seeds), "real" where the interval
excludes 0, at equal wall-clock (test perplexity) and at equal updates (validation perplexity
at the last update every run reached). Each model's mean, standard deviation and range over
its seeds stand beside it, and the routing statistics (top-1 share, entropy, loads, drops,
churn) go into results.json.

``--updates N`` trains every run for N updates instead of a wall-clock budget (equal training
compute; the routers comparison's default is 1,000), and the table compares validation
perplexity at equal updates. ``--parallel K`` runs K trainings at once, each on its own core
(``taskset``, one thread); the default is one per core for --updates, one at a time otherwise.
In the routers comparison, lossfree runs at DeepSeek-V3's rate (1e-3); where a run ends with
its busiest expert above 1.2 / E in training (not balanced within the run), "lossfree (rate
scaled)" runs too, at 10 / N (the bias can then cross the sigmoid's whole range in a tenth of
the run), labelled as such.

Resumable: a finished run's result is kept in --out (``RUN.result.json``), and in ``--keep DIR``
too (a folder of the repository, say, so that a new machine finds what an earlier one finished),
and skipped when the same command runs again, so a sweep can span days. A run of --updates that did not finish goes on
from its last validation (it saves a checkpoint at each); one with a wall-clock budget starts
again from its beginning. Each run records the commit it ran at. Ctrl-C or ``kill`` (SIGTERM)
ends every training it started, starts no other, and says in one line what was kept. Each run
prints a progress line at every validation: which run, its update, and the time elapsed and left.

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
import glob
import json
import os
import platform
import signal
import subprocess
import sys

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPTS)
# The comparison's rooms (scripts/reproduce/), and this checkout's fairseq_base, whichever one pip installed
sys.path[:0] = [SCRIPTS, REPO]

from reproduce.comparisons import (BALANCED_BUSIEST, COMPARISONS, LOSSFREE_SCALED, ROUTERS_UPDATES,  # noqa: E402
                                   START_UPDATES, UPCYCLING_UPDATES, Arm)
from reproduce.report import write_results  # noqa: E402
from reproduce.runs import run_plan, run_upcycling  # noqa: E402
from reproduce.training import STOPPED_BY, Stopped, stop_everything  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget per run")
    parser.add_argument("--seeds", type=int, default=5, help="runs per model, with seeds 1..N")
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
    parser.add_argument("--keep", default=None, help="also write each finished run's result here, and take the "
                                                     "results found here as finished (a folder that outlasts --out)")
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
    if args.keep:
        args.keep = os.path.abspath(args.keep)
        os.makedirs(args.keep, exist_ok=True)
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

    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, stop_everything)
    try:
        if args.comparison == "upcycling":
            results = run_upcycling(plan, args, cores)
        else:
            results = run_plan(plan, args, minutes, cores)
        lossfree = results.get("lossfree")
        if args.updates and lossfree and "lossfree" in args.models.split(",") and any(
                (run.get("train_busiest") or 0) > BALANCED_BUSIEST for run in lossfree["runs"]):
            rate = 10 / args.updates
            print(f"| lossfree at DeepSeek-V3's rate did not balance within {args.updates} updates (busiest expert "
                  f"above {BALANCED_BUSIEST} x the mean): {LOSSFREE_SCALED}, at {rate:g}", flush=True)
            config, overrides = COMPARISONS[args.comparison]["lossfree"]
            scaled = Arm("lossfree", config, [*overrides, f"model.base_bias_update_rate={rate}"], None, max_update)
            results.update(run_plan({LOSSFREE_SCALED: scaled}, args, minutes, cores))
    except Stopped:
        kept = len(glob.glob(os.path.join(args.out, "*.result.json")))
        sys.exit(f"reproduce_small: stopped ({STOPPED_BY['signal']}): every training it started was ended; the "
                 f"{kept} finished run(s) are kept in {args.out}, and the same command goes on from them" +
                 (" (unfinished runs of --updates from their last validation)" if args.updates else ""))

    machine = f"{platform.processor() or platform.machine()}, {len(cores)} of {os.cpu_count()} cores, no GPU" + (
        f", {args.parallel} runs at once, one core each" if args.parallel > 1 else "")
    write_results(results, {"minutes": args.minutes, "seeds": args.seeds, "machine": machine, "updates": args.updates,
                            "command": sys.argv[1:], "comparison": args.comparison,
                            **({"start_updates": args.start_updates} if args.comparison == "upcycling" else {})},
                  args.out)
    print(f"\nwrote {args.out}/results.md, results.json and plots")


if __name__ == "__main__":
    main()

"""Running a comparison's plan: every (model, seed) not already done, several at once, each on its
own core; a finished run's result is kept beside it, so that the same command resumes."""

import concurrent.futures
import json
import os
import queue
import shutil
import sys

from reproduce.comparisons import DENSE, FROM_DENSE, Arm, balanced_family, run_name
from reproduce.training import STOP, Stopped, commit, evaluate, expert_load, say, train


def run_upcycling(plan, args, cores):
    """The dense start (one run, seed 1), then every model of ``plan`` per seed for the whole
    length: those of FROM_DENSE go on from the dense start's last checkpoint, upcycled
    (``training.upcycled_start``) or as it is, with its data order, learning-rate schedule and
    optimizer state (--continue-once; their curves begin with the start's); the others train
    from scratch."""
    start_arm = Arm("dense", DENSE, [], None, args.start_updates)
    start, = run_plan({"dense start": start_arm}, args, 0, cores, seeds=1)["dense start"]["runs"]
    checkpoint = os.path.join(args.out, run_name(start_arm, 1), "checkpoint_last.pt")
    plan = {label: arm._replace(updates=args.start_updates + args.updates,
                                start=checkpoint if label in FROM_DENSE else None) for label, arm in plan.items()}
    results = run_plan(plan, args, 0, cores)
    began = start["curve"][-1]
    for label, r in results.items():
        if plan[label].start:
            for run in r["runs"]:
                run["curve"] = start["curve"] + [dict(p, seconds=p["seconds"] + began["seconds"])
                                                 for p in run["curve"] if p["updates"] > began["updates"]]
    return results


def kept_result(args, name):
    """A finished run's result, from --out or else from --keep; OSError or ValueError if there is none."""
    for folder in (args.out, args.keep):
        if folder and os.path.exists(os.path.join(folder, f"{name}.result.json")):
            with open(os.path.join(folder, f"{name}.result.json")) as f:
                return json.load(f)
    raise FileNotFoundError(name)


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
            done[label, seed] = kept_result(args, name)
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
            if STOP.is_set():
                raise Stopped(label)
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
               "routing": {"train": stats, "valid": curve[-1].get("routing", {}) if curve else {}},
               "expert_load": expert_load(args.data, save_dir) if arm.config != DENSE else {}}
        if balanced_family(arm):
            run["test_ppl_balanced"] = evaluate(args.data, save_dir, balanced=True)
        for folder in {args.out, args.keep or args.out}:  # --keep: also where a new machine finds it
            with open(os.path.join(folder, f"{run_name(arm, seed)}.result.json"), "w") as f:
                json.dump(run, f)
        say(f"|   {label}, seed {seed}: test perplexity {run['test_ppl']:.2f}")
        return run

    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = {(label, seed): pool.submit(one_run, i + 1, label, seed) for i, (label, seed) in enumerate(todo)}
        done.update({key: future.result() for key, future in futures.items()})
    for label, seed in runs:
        results[label]["runs"].append(done[label, seed])
    return results

"""One run of a comparison: train it (or continue it) with fairseq-hydra-train, following its log
for the validation curve and the routing statistics, and score it with fairseq-eval-lm."""

import contextlib
import datetime
import os
import re
import signal
import subprocess
import sys
import threading
import time

from reproduce.comparisons import DENSE, REPO, run_name

# An expert layer's routing statistic, "base1_top1=0.5" in a train_inner line, "| moe1_top1 0.5" in a valid one.
ROUTING = re.compile(r"\b([a-z]+\d+)_(top1|entropy|load_max|load_min|dropped)[= ]([0-9.]+)")
CHURN = re.compile(r"\b(\w+)_churn ([0-9.]+)")
LOADED = re.compile(r"Loaded checkpoint .* \(epoch \d+ @ (\d+) updates\)")
SAVED = re.compile(r"Saved checkpoint .* \(epoch \d+ @ (\d+) updates")
STAMP = re.compile(r"^(?:\[)?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


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


def train(arm, data, minutes, out, seed, validate_every=50, core=None, progress=""):
    """(save_dir, validation curve, training statistics of the last logged batches). ``minutes`` 0:
    no wall-clock budget (``arm.updates`` ends the run, which saves a checkpoint at every validation
    and continues from the last one if it was stopped); ``core``: run on that core, one thread."""
    name, max_update = run_name(arm, seed), arm.updates
    save_dir = os.path.join(out, name)
    log_path = os.path.join(out, f"{name}.log")
    start = arm.start and (arm.start if arm.config == DENSE else upcycled_start(arm, seed, data, out))
    cmd = ["fairseq-hydra-train", "--config-dir", os.path.join(REPO, "configs"), "--config-name", arm.config,
           f"task.data={data}", f"checkpoint.save_dir={save_dir}", f"hydra.run.dir={save_dir}/hydra",
           f"optimization.max_update={max_update}", f"optimization.stop_time_hours={minutes / 60}",
           f"dataset.validate_interval_updates={validate_every}", f"common.log_interval={min(25, validate_every)}",
           f"common.seed={seed}",
           *arm.overrides] + ([f"model.base_experts={arm.experts}"] if arm.experts else []) + (
               [f"checkpoint.continue_once={start}"] if start else []) + (
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
                                 "busiest": run["stats"]["busiest"], "routing": routing_stats(line),
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
    with open(log_path, "a", buffering=1) as log, started(cmd, env) as proc:
        for line in proc.stdout:
            log.write(line)
            read(line, live=True)
    if STOP.is_set():
        raise Stopped(name)
    if proc.returncode != 0:
        sys.exit(f"reproduce_small: {name} failed; see {log_path}")
    return save_dir, run["curve"], run["stats"]


# Ctrl-C or kill (SIGTERM): the command stops every training it started and starts no other
# (``stop_everything``); the trainings run in sessions of their own, which nothing else would end.
STOP = threading.Event()
STOPPED_BY = {"signal": None}  # "Ctrl-C" or "SIGTERM", for the last line
RUNNING = set()


class Stopped(Exception):
    """A run ended by ``stop_everything``."""


@contextlib.contextmanager
def started(cmd, env):
    """``cmd`` running, its output piped, in a session of its own: Ctrl-C reaches this command
    alone, which stops it (``stop_everything``) without the training's own traceback."""
    if STOP.is_set():
        raise Stopped(cmd[-1])
    # This checkout's fairseq_base in every command (fairseq-base-upcycle's too), whichever one pip
    # installed: the commit each result records is the code that made it.
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")])))
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, env=env, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        RUNNING.add(proc)
        try:
            yield proc
        finally:
            RUNNING.discard(proc)


def finished(cmd):
    """What ``cmd`` printed (stdout and stderr), once it has succeeded; ``Stopped`` if it was stopped."""
    with started(cmd, os.environ) as proc:
        printed = proc.stdout.read()
    if STOP.is_set():
        raise Stopped(cmd[0])
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, printed)
    return printed


def stop_everything(signum, _frame=None):
    """The SIGINT and SIGTERM handler: no run starts any more, and every running one is terminated."""
    STOPPED_BY["signal"] = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    STOP.set()
    for proc in list(RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)


def upcycled_start(arm, seed, data, out):
    """The dense start (``arm.start``) upcycled by fairseq-base-upcycle into ``arm``'s model, its new
    layers drawn with ``seed``; the file keeps the dense run's updates, data position, schedule
    and optimizer state, for --continue-once."""
    from omegaconf import OmegaConf

    path = os.path.join(out, f"{run_name(arm, seed)}.upcycled.pt")
    if os.path.exists(path):  # written all or nothing
        return path
    config = OmegaConf.load(os.path.join(REPO, "configs", f"{arm.config}.yaml"))
    options = {key: value for key, value in config.model.items() if key.startswith("base_")}
    options.update(override[len("model."):].split("=", 1) for override in arm.overrides
                   if override.startswith("model.base_"))
    if arm.experts:
        options["base_experts"] = arm.experts
    finished(["fairseq-base-upcycle", arm.start, "--out", path, "--data", data, "--seed", str(seed),
              "--criterion", config.criterion, *(f"--{key.replace('_', '-')}={value}" for key, value in options.items())])
    return path


def routing_stats(line):
    """Each routing statistic of a log line (the logs' names: top1, entropy, load_max, load_min,
    dropped), the mean over the expert layers; {} for a model without them."""
    values = {}
    for _, statistic, value in ROUTING.findall(line):
        values.setdefault(statistic, []).append(float(value))
    return {statistic: sum(v) / len(v) for statistic, v in values.items()}


def training_stats(line):
    """From a train_inner line, ``routing_stats`` with, under their earlier names, the share of
    (token, choice) pairs dropped and the busiest expert's load over the mean (its share of the
    pairs times E; None for dense)."""
    stats = routing_stats(line)
    return dict(stats, dropped=stats.get("dropped", 0.0), busiest=stats.get("load_max"))


def evaluate(data, save_dir, balanced=False):
    """Test perplexity of the run's last checkpoint; ``balanced``: with BASE's balanced evaluation
    routing (the routing it trains with) instead of the checkpoint's greedy."""
    overrides = ["--model-overrides", "{'base_eval_routing': 'balanced'}"] if balanced else []
    printed = finished(["fairseq-eval-lm", data, "--user-dir", os.path.join(REPO, "fairseq_base"), "--path",
                        os.path.join(save_dir, "checkpoint_last.pt"), "--gen-subset", "test", "--tokens-per-sample",
                        "128", "--batch-size", "16", "--cpu", "--num-workers", "0", *overrides])
    return float(re.search(r"Perplexity: ([0-9.]+)", printed).group(1))


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

"""The plugin does no harm: `--user-dir fairseq_base` is imported for every model a user runs.

A dense `transformer_lm` and `transformer_lm_base` train, resume (with `--optimizer sgd`,
whose checkpoints hold an argparse Namespace), score with fairseq-eval-lm (whole, and in
shards with `--num-shards 3`, whose last shard fairseq pads with empty batches) and sample,
from the command line and through fairseq's Python entry points called with a Namespace; and
the dense model trains to the same losses and parameters with the plugin as without it.
"""

import concurrent.futures
import os
import re
import sys

import pytest
import torch

from fairseq_runs import BIN, EVAL, TINY_TRUNK, losses, run, run_two_at_a_time

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {"transformer_lm": ["--arch", "transformer_lm"],
          "transformer_lm_base": ["--arch", "transformer_lm_base", "--base-experts", "2"]}
SGD = ["--optimizer", "sgd", "--lr", "0.1"]  # a legacy fairseq component: its checkpoints hold a Namespace
SHARDS = 3
# Lines longer than the model's 64 positions (Brown has some) are skipped, as fairseq's option says.
SAMPLE = ["--task", "language_modeling", "--gen-subset", "valid", "--tokens-per-sample", "64",
          "--sample-break-mode", "eos", "--beam", "2", "--max-len-b", "5", "--batch-size", "8", "--num-workers", "0",
          "--skip-invalid-size-inputs-valid-test"]


def train_args(data, model, save_dir, updates):
    return [str(data / "bin"), "--user-dir", "fairseq_base", "--cpu", *TINY_TRUNK, *MODELS[model], *SGD,
            "--save-dir", str(save_dir), "--max-update", str(updates), "--log-interval", "5"]


def eval_args(data, checkpoint, *flags):
    return [str(data / "bin"), "--path", str(checkpoint), *EVAL, *flags]


def shard_flags(shard):
    return ["--num-shards", str(SHARDS), "--shard-id", str(shard)]


def evaluated(log):
    """(loss, tokens) of every fairseq-eval-lm run in ``log``."""
    tokens = [int(n.replace(",", "")) for n in re.findall(r"Evaluated ([0-9,]+) tokens", log)]
    loss = [float(x) for x in re.findall(r"Loss \(base 2\): ([0-9.]+)", log)]
    assert len(tokens) == len(loss), log[-3000:]
    return list(zip(loss, tokens))


def assert_shards_add_up(whole, shards):
    """The shards hold every token of the whole once, and their losses average to its loss."""
    (loss, tokens), = whole
    assert len(shards) == SHARDS and sum(n for _, n in shards) == tokens, (whole, shards)
    assert abs(sum(l * n for l, n in shards) / tokens - loss) < 1e-3, (whole, shards)


def assert_trained_and_resumed(log, save_dir):
    assert re.search(r"Loaded checkpoint \S*checkpoint_last\.pt \(epoch \d+ @ 5 updates\)", log), log[-3000:]
    assert "num_updates 10" in log, log[-3000:]
    assert torch.load(save_dir / "checkpoint_last.pt", weights_only=True)["optimizer_history"][-1]["num_updates"] == 10


def command_line_run(data, root, model):
    """Train 5 updates, resume to 10, score whole and in shards, sample: fairseq's commands."""
    save_dir = root / model
    logs = {"save_dir": save_dir}
    for updates in (5, 10):
        result = run(os.path.join(BIN, "fairseq-train"), *train_args(data, model, save_dir, updates))
    logs["resume"] = result.stdout + result.stderr
    checkpoint = save_dir / "checkpoint_last.pt"
    evals = [run(os.path.join(BIN, "fairseq-eval-lm"), *eval_args(data, checkpoint, *flags))
             for flags in [[]] + [shard_flags(k) for k in range(SHARDS)]]
    logs["eval"] = [result.stdout + result.stderr for result in evals]
    logs["sample"] = run(os.path.join(BIN, "fairseq-interactive"), str(data / "bin"), "--user-dir", "fairseq_base",
                         "--task", "language_modeling", "--path", str(checkpoint), "--cpu", "--beam", "2",
                         "--max-len-b", "5", input="T h e _ k i n g\n").stdout
    return logs


@pytest.fixture(scope="module")
def command_line(data_bin, tmp_path_factory):
    """Both models' command-line runs, side by side (each is one process at a time)."""
    root = tmp_path_factory.mktemp("command_line")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        runs = {model: pool.submit(command_line_run, data_bin, root, model) for model in MODELS}
        return {model: future.result() for model, future in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_command_line(command_line, model):
    logs = command_line[model]
    assert_trained_and_resumed(logs["resume"], logs["save_dir"])
    whole, *shards = logs["eval"]
    assert_shards_add_up(evaluated(whole), [found for log in shards for found in evaluated(log)])
    assert re.search(r"^H-0\t-?[0-9.]+\t\S", logs["sample"], re.M), logs["sample"][-2000:]


def python_steps(data, save_dir, model):
    """fairseq's Python entry points, each called with a Namespace, in one process (as fairseq's tests)."""
    checkpoint = save_dir / "checkpoint_last.pt"
    steps = [["train", *train_args(data, model, save_dir, 5)], ["train", *train_args(data, model, save_dir, 10)],
             ["eval_lm", *eval_args(data, checkpoint)],
             *(["eval_lm", *eval_args(data, checkpoint, *shard_flags(k))] for k in range(SHARDS)),
             ["generate", str(data / "bin"), "--user-dir", "fairseq_base", "--path", str(checkpoint), "--cpu",
              *SAMPLE],
             ["distributed_init", *train_args(data, model, save_dir, 10), "--distributed-world-size", "1",
              "--distributed-backend", "gloo", "--distributed-init-method", f"file://{save_dir}-rendezvous"]]
    command = [sys.executable, os.path.join(HERE, "fairseq_entry_points.py")]
    for step in steps:
        command += [*step, "--then"]
    return command[:-1]


@pytest.fixture(scope="module")
def python_entry_points(data_bin, tmp_path_factory):
    root = tmp_path_factory.mktemp("python_entry_points")
    results = run_two_at_a_time([python_steps(data_bin, root / model, model) for model in MODELS])
    return {model: (result, root / model) for model, result in zip(MODELS, results)}


@pytest.mark.parametrize("model", MODELS)
def test_python_entry_points_with_a_namespace(python_entry_points, model):
    result, save_dir = python_entry_points[model]
    log = result.stdout + result.stderr
    assert_trained_and_resumed(log, save_dir)
    found = evaluated(log)
    assert_shards_add_up(found[:1], found[1:])
    assert re.search(r"^H-\d+\t-?[0-9.]+\t\S", result.stdout, re.M), result.stdout[-2000:]
    assert "distributed_init: rank 0" in result.stdout


def test_a_dense_model_trains_as_without_the_plugin(dense_runs):
    """10 updates of a dense transformer_lm (conftest's ``dense_runs``): the same losses and
    parameters with the plugin imported as in a process that never imports it."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # each is one process at a time
        (plugin_dir, plugin), (fairseq_dir, fairseq) = pool.map(dense_runs, (True, False))
    assert "fairseq_base" not in fairseq.stdout + fairseq.stderr
    assert losses(plugin) == losses(fairseq) and sorted(losses(plugin)) == list(range(1, 11))
    with_plugin, without = (torch.load(save_dir / "checkpoint_last.pt", weights_only=True)["model"]
                            for save_dir in (plugin_dir, fairseq_dir))
    assert with_plugin.keys() == without.keys()
    for name, value in without.items():
        assert torch.equal(with_plugin[name], value), name

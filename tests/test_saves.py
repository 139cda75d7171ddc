"""Nothing is lost when saving goes wrong (2 gloo workers under torchrun, a save every 5
updates): faults injected into the workers (``faults/sitecustomize.py``) at a write or a
rename, damaged files, a missing --restore-file, a save directory in use, diverged weights.
Each test checks that every earlier checkpoint is still there and readable."""

import json
import os
import re
import shutil
import socket
import subprocess

import pytest
import torch

from test_end_to_end import data_bin, run, run_two_at_a_time  # noqa: F401  (fixture)
from test_torchrun import BIN, TINY_MODEL, error_messages, losses, torchrun_command

from fairseq_base.fairseq_patches import saves

pytestmark = pytest.mark.slow
FAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faults")
SAVES = ["--base-experts", "2", "--ddp-backend", "legacy_ddp", "--save-interval-updates", "5", "--log-interval", "5"]


def train(data, save_dir, updates, *flags, fault=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        env.update(FAIRSEQ_BASE_FAULT=fault, PYTHONPATH=FAULTS + os.pathsep + env.get("PYTHONPATH", ""))
    result = subprocess.run(torchrun_command(2, data, save_dir, *SAVES, "--max-update", str(updates), *flags),
                            capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def updates_of(path):
    return torch.load(path, weights_only=True)["optimizer_history"][-1]["num_updates"]


def assert_readable_set(save_dir, name, updates):
    for rank in range(2):
        assert updates_of(save_dir / f"{name}-rank-{rank}.pt") == updates


def no_temporaries(save_dir):
    return not [p.name for p in save_dir.iterdir() if ".tmp-" in p.name]


def one_error(result, fragment):
    errors = error_messages(result.stderr)
    assert len(errors) == 1 and fragment in next(iter(errors)), result.stderr[-3000:]
    return next(iter(errors))


@pytest.fixture(scope="module")
def saved_at_5(data_bin, tmp_path_factory):  # noqa: F811
    """A run saved at update 5: checkpoint_1_5-rank-{0,1} and checkpoint_last-rank-{0,1}."""
    root = tmp_path_factory.mktemp("saved_at_5")
    train(data_bin, root, 5)
    assert_readable_set(root, "checkpoint_last", 5)
    return root


def copy_of(saved, tmp_path):
    target = tmp_path / "save"
    shutil.copytree(saved, target)
    return target


def test_a_full_disk_on_one_worker_keeps_every_earlier_file(data_bin, saved_at_5, tmp_path):  # noqa: F811
    save_dir = copy_of(saved_at_5, tmp_path)
    result = train(data_bin, save_dir, 10, fault="enospc:1:1", check=False)
    assert result.returncode != 0
    line = one_error(result, "saving the checkpoint of update 10 to")
    assert str(save_dir) in line and "No space left on device" in line and "nothing of this save was kept" in line
    assert_readable_set(save_dir, "checkpoint_last", 5)
    assert_readable_set(save_dir, "checkpoint_1_5", 5)
    assert not list(save_dir.glob("checkpoint_1_10*")) and no_temporaries(save_dir)
    resumed = train(data_bin, save_dir, 10)  # the disk has room again: the run goes on from update 5
    assert "(epoch 1 @ 5 updates)" in resumed.stdout + resumed.stderr and sorted(losses(resumed)) == [10]


def test_a_kill_while_renaming_resumes_from_the_newest_complete_set(data_bin, saved_at_5, tmp_path):  # noqa: F811
    """Worker 1 dies after renaming checkpoint_1_10 and checkpoint_best, before checkpoint_last (its 3rd rename)."""
    save_dir = copy_of(saved_at_5, tmp_path)
    killed = train(data_bin, save_dir, 10, fault="kill:1:3", check=False)
    assert killed.returncode != 0
    assert updates_of(save_dir / "checkpoint_last-rank-1.pt") == 5
    resumed = train(data_bin, save_dir, 15)
    log = resumed.stdout + resumed.stderr
    newest = re.search(r"resuming from \S*checkpoint_1_(\d+)-rank-\d\.pt \(update (\d+)\), the newest checkpoint set",
                       log)
    assert newest and newest.group(1) == newest.group(2) in ("5", "10"), log[-3000:]
    assert sorted(losses(resumed))[-1] == 15
    assert_readable_set(save_dir, "checkpoint_last", 15)


def test_unreadable_last_checkpoints_resume_from_the_newest_complete_set(data_bin, saved_at_5, tmp_path):  # noqa: F811
    save_dir = copy_of(saved_at_5, tmp_path)
    last = save_dir / "checkpoint_last-rank-0.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    (save_dir / "checkpoint_last-rank-1.pt").write_bytes(b"")  # empty
    resumed = train(data_bin, save_dir, 10)
    log = resumed.stdout + resumed.stderr
    assert "resuming from" in log and "checkpoint_1_5-rank-0.pt (update 5)" in log, log[-3000:]
    assert "checkpoint_last-rank-0.pt is truncated or corrupt" in log
    assert "Traceback" not in log and sorted(losses(resumed)) == [10]


def test_with_no_complete_set_one_line_says_what_to_pass(data_bin, saved_at_5, tmp_path):  # noqa: F811
    save_dir = copy_of(saved_at_5, tmp_path)
    (save_dir / "checkpoint_last-rank-1.pt").write_bytes(b"")
    for stale in save_dir.glob("checkpoint_1_5*"):
        stale.unlink()
    result = train(data_bin, save_dir, 10, check=False)
    line = one_error(result, "checkpoint_last-rank-1.pt is empty (0 bytes)")
    assert "no set of checkpoint_E_U-rank-*.pt" in line and "pass --restore-file" in line
    assert "EOFError" not in result.stderr and "PytorchStreamReader" not in result.stderr  # torch's raw errors


def one_process(data, save_dir, updates, *flags):
    return run(os.path.join(BIN, "fairseq-train"), str(data / "bin"), "--user-dir", "fairseq_base", "--cpu",
               *TINY_MODEL, *SAVES, "--save-dir", str(save_dir), "--max-update", str(updates), *flags, check=False)


def one_line(result, fragment):
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("fairseq_base: error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-3000:]
    return errors[0]


def test_a_restore_file_that_does_not_exist_is_one_line(data_bin, tmp_path):  # noqa: F811
    save_dir = tmp_path / "save"
    save_dir.mkdir()
    (save_dir / "checkpoint_1_5.pt").write_bytes(b"a checkpoint")
    line = one_line(one_process(data_bin, save_dir, 10, "--restore-file", "checkpoint_1_5.pt"),
                    "--restore-file checkpoint_1_5.pt: no such checkpoint")
    assert f"not --save-dir: pass {save_dir / 'checkpoint_1_5.pt'}" in line
    assert [p.name for p in save_dir.iterdir()] == ["checkpoint_1_5.pt"]  # nothing written, no new run


def test_a_save_directory_in_use_is_refused_and_a_stale_lock_taken_over(data_bin, tmp_path):  # noqa: F811
    lock = tmp_path / "fairseq_base.lock"
    # Held by a process that runs (this one): refused, naming it, and nothing written.
    lock.write_text(json.dumps({"run_id": "abc", "host": socket.gethostname(), "pid": os.getpid(), "since": "now"}))
    line = one_line(one_process(data_bin, tmp_path, 5), "is in use by another run (run abc on host")
    assert f"process {os.getpid()}" in line and [p.name for p in tmp_path.iterdir()] == ["fairseq_base.lock"]
    # Left by a process that no longer runs: taken over with a warning, and released at the end.
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps({"run_id": "abc", "host": socket.gethostname(), "pid": dead.pid, "since": "then"}))
    taken = one_process(data_bin, tmp_path, 5)
    assert taken.returncode == 0 and "taking over" in taken.stdout + taken.stderr and not lock.exists()


def test_two_runs_started_together_one_stops(data_bin, tmp_path):  # noqa: F811
    first, second = run_two_at_a_time([[os.path.join(BIN, "fairseq-train"), str(data_bin / "bin"), "--user-dir",
                                        "fairseq_base", "--cpu", *TINY_MODEL, *SAVES, "--save-dir", str(tmp_path),
                                        "--max-update", "100"]] * 2, check=False)
    assert sorted([first.returncode, second.returncode])[0] == 0, (first.stderr[-2000:], second.stderr[-2000:])
    loser = first if first.returncode else second
    one_line(loser, "is in use by another run")


def test_diverged_weights_are_never_saved(data_bin, saved_at_5, tmp_path):  # noqa: F811
    """An lr of 1e39 makes the weights inf in one step while the gradients stay finite."""
    save_dir = copy_of(saved_at_5, tmp_path)
    result = train(data_bin, save_dir, 10, "--lr", "1e39", "--reset-lr-scheduler", "--save-interval-updates", "1",
                   check=False)
    one_error(result, "the weights hold inf or NaN at update 6")
    assert_readable_set(save_dir, "checkpoint_last", 5)
    assert no_temporaries(save_dir) and not list(save_dir.glob("checkpoint_1_6*"))


def test_crash_dump_is_named_per_expert_parallel_rank(monkeypatch, tmp_path):
    written = []
    monkeypatch.setattr(saves, "FAIRSEQ_TRAINER_SAVE_CHECKPOINT", lambda self, name, extra: written.append(name))
    expert = torch.nn.Parameter(torch.zeros(1))
    expert.expert = True

    class Trainer:
        data_parallel_world_size, checkpoint_suffix = 2, "-rank-1"

        def get_model(self):
            return torch.nn.ParameterList([expert])

    saves.trainer_save_checkpoint(Trainer(), str(tmp_path / "crash.pt"), {})
    saves.trainer_save_checkpoint(Trainer(), str(tmp_path / "checkpoint_1_5-rank-1.pt"), {})
    assert written == [str(tmp_path / "crash-rank-1.pt"), str(tmp_path / "checkpoint_1_5-rank-1.pt")]

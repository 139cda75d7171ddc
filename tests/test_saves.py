"""Nothing is lost when saving or resuming goes wrong, and every worker takes the same steps
whatever each one finds (2 gloo workers under torchrun, a save every 5 updates), under every DDP
backend the plugin accepts: faults injected into the workers (``faults/sitecustomize.py``) at a
write or a rename, damaged files on one worker or all, files of different saves, diverged
weights, a missing --restore-file, a save directory in use. Each test checks that every earlier
checkpoint is still there and readable."""

import json
import os
import re
import shutil
import socket
import subprocess

import pytest
import torch

from fairseq_runs import (BIN, TINY_MODEL, TWO_WORKER_RUN, error_messages, losses, run, run_two_at_a_time,
                          torchrun_command, workers_stderr)

from fairseq_base.fairseq_patches import saves

pytestmark = pytest.mark.slow
FAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faults")
SAVES = TWO_WORKER_RUN  # a save every 5 updates, as the shared run (conftest's two_worker_runs) that most tests resume
# Every DDP backend the plugin accepts with experts (c10d is fairseq's alias of pytorch_ddp). torch's
# DDP (pytorch_ddp) wraps the model in a collective at the first touch of trainer.model: a worker
# that decided alone to skip fairseq's loading would meet the others in another collective.
BACKENDS = ["legacy_ddp", "pytorch_ddp", "no_c10d"]


def train(data, save_dir, updates, *flags, backend="legacy_ddp", workers=2, fault=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        env.update(FAIRSEQ_BASE_FAULT=fault, PYTHONPATH=FAULTS + os.pathsep + env.get("PYTHONPATH", ""))
    return run(*torchrun_command(workers, data, save_dir, *SAVES, "--ddp-backend", backend, "--max-update",
                                 str(updates), *flags), env=env, check=check)


def updates_of(path):
    return torch.load(path, weights_only=True)["optimizer_history"][-1]["num_updates"]


def assert_readable_set(save_dir, name, updates):
    for rank in range(2):
        assert updates_of(save_dir / f"{name}-rank-{rank}.pt") == updates


def no_temporaries(save_dir):
    return not [p.name for p in save_dir.iterdir() if ".tmp-" in p.name]


def one_error(result, fragment, workers=2):
    """The one line that every worker stopped with; none of them lost the others or waited for them."""
    errors = error_messages(result.stderr)
    assert len(errors) == 1 and fragment in next(iter(errors)), result.stderr[-3000:]
    assert workers_stderr(result.stderr).count("fairseq_base: error:") == workers, result.stderr[-3000:]
    for other in ("Connection closed", "DDP expects same model", "Timed out"):
        assert other not in result.stderr, result.stderr[-3000:]
    return next(iter(errors))


@pytest.fixture(scope="module", params=BACKENDS)
def saved(request, two_worker_runs):
    """(backend, save dir) of the shared run on 2 workers under that backend, saved at updates 5 and
    10: checkpoint_1_{5,10}-rank-{0,1} and checkpoint_last-rank-{0,1} (update 10)."""
    root = two_worker_runs(request.param)
    assert_readable_set(root, "checkpoint_last", 10)
    return request.param, root


def copy_of(saved_dir, tmp_path):
    target = tmp_path / "save"
    shutil.copytree(saved_dir, target)
    return target


def truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def put_nan(path):
    state = torch.load(path, weights_only=True)
    name = next(key for key, value in state["model"].items() if value.is_floating_point())
    state["model"][name].view(-1)[0] = float("nan")
    torch.save(state, path)


# How each case breaks checkpoint_last (worker r reads checkpoint_last-rank-r.pt), and what the
# line that says why the workers resume from the newest complete set names.
BROKEN_LAST = {
    "one worker's file empty": (lambda save_dir: (save_dir / "checkpoint_last-rank-1.pt").write_bytes(b""),
                                "checkpoint_last-rank-1.pt is empty (0 bytes)"),
    "every worker's file unreadable": (lambda save_dir: (truncate(save_dir / "checkpoint_last-rank-0.pt"),
                                                         (save_dir / "checkpoint_last-rank-1.pt").write_bytes(b"")),
                                       "checkpoint_last-rank-0.pt is truncated or corrupt"),
    "files of different saves": (lambda save_dir: shutil.copy(save_dir / "checkpoint_1_5-rank-1.pt",
                                                              save_dir / "checkpoint_last-rank-1.pt"),
                                 "do not belong together (different updates)"),
    "NaN in one worker's file": (lambda save_dir: put_nan(save_dir / "checkpoint_last-rank-1.pt"),
                                 "checkpoint_last-rank-1.pt: tensor model/"),
}


def assert_resumed_from_set(resumed, updates, why, through):
    """The workers resumed from checkpoint_1_{updates}-rank-{0,1}, saying why, and trained on to ``through``."""
    log = resumed.stdout + resumed.stderr
    for rank in range(2):
        assert re.search(rf"resuming from \S*checkpoint_1_{updates}-rank-{rank}\.pt \(update {updates}\), the newest "
                         rf"checkpoint set that is complete on every worker, because the last one cannot be used: "
                         rf".*{re.escape(why)}", log), log[-3000:]
    assert "Traceback" not in log and sorted(losses(resumed))[-1] == through


@pytest.mark.parametrize("case", list(BROKEN_LAST))
def test_a_broken_last_checkpoint_resumes_every_worker_from_the_newest_complete_set(data_bin, saved, tmp_path,
                                                                                    case):
    backend, saved_dir = saved
    save_dir = copy_of(saved_dir, tmp_path)
    breaks, why = BROKEN_LAST[case]
    breaks(save_dir)
    resumed = train(data_bin, save_dir, 15, backend=backend)
    assert_resumed_from_set(resumed, 10, why, 15)
    assert_readable_set(save_dir, "checkpoint_last", 15)


def test_with_no_complete_set_one_line_says_what_to_pass(data_bin, saved, tmp_path):
    backend, saved_dir = saved
    save_dir = copy_of(saved_dir, tmp_path)
    (save_dir / "checkpoint_last-rank-1.pt").write_bytes(b"")
    for stale in save_dir.glob("checkpoint_1_*-rank-1.pt"):
        stale.unlink()
    result = train(data_bin, save_dir, 15, backend=backend, check=False)
    line = one_error(result, "checkpoint_last-rank-1.pt is empty (0 bytes)")
    assert "no set of checkpoint_E_U-rank-*.pt" in line and "pass --restore-file" in line
    assert "EOFError" not in result.stderr and "PytorchStreamReader" not in result.stderr  # torch's raw errors


def test_a_full_disk_on_one_worker_keeps_every_earlier_file(data_bin, saved, tmp_path):
    backend, saved_dir = saved
    save_dir = copy_of(saved_dir, tmp_path)
    result = train(data_bin, save_dir, 15, backend=backend, fault="enospc:1:1", check=False)
    assert result.returncode != 0
    line = one_error(result, "saving the checkpoint of update 15 to")
    assert str(save_dir) in line and "No space left on device" in line and "nothing of this save was kept" in line
    assert_readable_set(save_dir, "checkpoint_last", 10)
    assert_readable_set(save_dir, "checkpoint_1_10", 10)
    assert not list(save_dir.glob("checkpoint_1_15*")) and no_temporaries(save_dir)
    resumed = train(data_bin, save_dir, 15, backend=backend)  # the disk has room again: on from update 10
    assert "(epoch 1 @ 10 updates)" in resumed.stdout + resumed.stderr and sorted(losses(resumed)) == [15]


def test_a_kill_while_renaming_resumes_from_the_newest_complete_set(data_bin, saved, tmp_path):
    """Worker 1 dies after renaming checkpoint_1_15 and checkpoint_best, before checkpoint_last (its 3rd rename)."""
    backend, saved_dir = saved
    save_dir = copy_of(saved_dir, tmp_path)
    killed = train(data_bin, save_dir, 15, backend=backend, fault="kill:1:3", check=False)
    assert killed.returncode != 0
    assert updates_of(save_dir / "checkpoint_last-rank-1.pt") == 10
    resumed = train(data_bin, save_dir, 20, backend=backend)
    log = resumed.stdout + resumed.stderr
    newest = re.search(r"resuming from \S*checkpoint_1_(\d+)-rank-\d\.pt \(update (\d+)\), the newest checkpoint set",
                       log)
    assert newest and newest.group(1) == newest.group(2) in ("10", "15"), log[-3000:]
    assert sorted(losses(resumed))[-1] == 20
    assert_readable_set(save_dir, "checkpoint_last", 20)


def test_diverged_weights_are_never_saved(data_bin, saved, tmp_path):
    """An lr of 1e39 makes the weights inf in one step while the gradients stay finite."""
    backend, saved_dir = saved
    save_dir = copy_of(saved_dir, tmp_path)
    result = train(data_bin, save_dir, 15, "--lr", "1e39", "--reset-lr-scheduler", "--save-interval-updates", "1",
                   backend=backend, check=False)
    one_error(result, "the weights hold inf or NaN at update 11")
    assert_readable_set(save_dir, "checkpoint_last", 10)
    assert no_temporaries(save_dir) and not list(save_dir.glob("checkpoint_1_11*"))


def test_four_workers_with_expert_replicas_resume_together(data_bin, tmp_path):
    """W = 4 in expert-parallel groups of P = 2 (torch's DDP): workers 1 and 3 read
    checkpoint_last-rank-1.pt, which is empty; all four resume from the newest complete set."""
    flags = ["--base-expert-parallel-size", "2"]
    train(data_bin, tmp_path, 10, *flags, backend="pytorch_ddp", workers=4)
    (tmp_path / "checkpoint_last-rank-1.pt").write_bytes(b"")
    resumed = train(data_bin, tmp_path, 15, *flags, backend="pytorch_ddp", workers=4)
    assert_resumed_from_set(resumed, 10, "checkpoint_last-rank-1.pt is empty (0 bytes)", 15)
    assert len(re.findall(r"resuming from \S*checkpoint_1_10-rank-1\.pt", resumed.stdout + resumed.stderr)) == 2
    assert_readable_set(tmp_path, "checkpoint_last", 15)


def test_spawned_workers_resume_together(data_bin, tmp_path):
    """fairseq's own launch (--distributed-world-size 2, no torchrun) with torch's DDP: one worker's
    checkpoint_last is empty."""
    command = [os.path.join(BIN, "fairseq-train"), str(data_bin / "bin"), "--user-dir", "fairseq_base", "--cpu",
               "--distributed-world-size", "2", *TINY_MODEL, *SAVES, "--ddp-backend", "pytorch_ddp",
               "--save-dir", str(tmp_path)]
    os.environ["OMP_NUM_THREADS"] = "1"
    run(*command, "--max-update", "10")
    (tmp_path / "checkpoint_last-rank-0.pt").write_bytes(b"")
    resumed = run(*command, "--max-update", "15")
    assert_resumed_from_set(resumed, 10, "checkpoint_last-rank-0.pt is empty (0 bytes)", 15)


def one_process(data, save_dir, updates, *flags):
    return run(os.path.join(BIN, "fairseq-train"), str(data / "bin"), "--user-dir", "fairseq_base", "--cpu",
               *TINY_MODEL, *SAVES, "--save-dir", str(save_dir), "--max-update", str(updates), *flags, check=False)


def one_line(result, fragment):
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("fairseq_base: error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-3000:]
    return errors[0]


def test_a_restore_file_that_does_not_exist_is_one_line(data_bin, tmp_path):
    save_dir = tmp_path / "save"
    save_dir.mkdir()
    (save_dir / "checkpoint_1_5.pt").write_bytes(b"a checkpoint")
    line = one_line(one_process(data_bin, save_dir, 10, "--restore-file", "checkpoint_1_5.pt"),
                    "--restore-file checkpoint_1_5.pt: no such checkpoint")
    assert f"not --save-dir: pass {save_dir / 'checkpoint_1_5.pt'}" in line
    assert [p.name for p in save_dir.iterdir()] == ["checkpoint_1_5.pt"]  # nothing written, no new run


def test_a_save_directory_in_use_is_refused_and_a_stale_lock_taken_over(data_bin, tmp_path):
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


def test_two_runs_started_together_one_stops(data_bin, tmp_path):
    first, second = run_two_at_a_time([[os.path.join(BIN, "fairseq-train"), str(data_bin / "bin"), "--user-dir",
                                        "fairseq_base", "--cpu", *TINY_MODEL, *SAVES, "--save-dir", str(tmp_path),
                                        "--max-update", "100"]] * 2, check=False)
    assert sorted([first.returncode, second.returncode])[0] == 0, (first.stderr[-2000:], second.stderr[-2000:])
    loser = first if first.returncode else second
    one_line(loser, "is in use by another run")


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

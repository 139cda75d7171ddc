"""Workers never train or score from per-worker checkpoint files that do not belong together
(torchrun, 2 gloo workers): each file carries its run id and update, and the workers compare
them, and a checksum of their shared parameters, before the first step; a run that resumes from
its files continues as the uninterrupted run."""

import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

from fairseq_runs import (BIN, EVAL, TWO_WORKER_RUN, error_messages, losses, run, run_two_at_a_time, torchrun_command,
                          torchrun_train, workers_stderr)

COMMON = [*TWO_WORKER_RUN, "--ddp-backend", "legacy_ddp"]  # run A is the shared run (conftest's two_worker_runs)
MISMATCH = "fairseq_base: error: the workers loaded checkpoint files that do not belong together"

pytestmark = pytest.mark.slow


def stamp_of(path):
    return torch.load(path, weights_only=True)["extra_state"]["fairseq_base"]


@pytest.fixture(scope="module")
def runs(data_bin, two_worker_runs, tmp_path_factory):
    """Run A (a copy of the shared run) saved at update 10 (rank 1's file kept) and resumed to 20; run B
    (another seed) at 10; run "straight", A's run without the interruption. root.resumed: the resumed
    run's output."""
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(two_worker_runs("legacy_ddp"), root / "a")
    torchrun_train(2, data_bin, root / "b", *COMMON, "--max-update", "10", "--seed", "4")
    shutil.copy(root / "a" / "checkpoint_last-rank-1.pt", root / "a10-rank-1.pt")
    resumed, straight = run_two_at_a_time([torchrun_command(2, data_bin, root / "a", *COMMON, "--max-update", "20"),
                                           torchrun_command(2, data_bin, root / "straight", *COMMON,
                                                            "--max-update", "20")])
    (root / "resumed.log").write_text(resumed.stdout + resumed.stderr)
    (root / "straight.log").write_text(straight.stdout + straight.stderr)
    return root


def test_resume_matches_uninterrupted_run(runs):
    resumed, straight = (losses(SimpleNamespace(stdout=(runs / name).read_text(), stderr=""))
                         for name in ("resumed.log", "straight.log"))
    assert sorted(resumed) == [15, 20] and sorted(straight) == [5, 10, 15, 20]
    for update, loss in resumed.items():
        assert abs(loss - straight[update]) <= 1e-3 * straight[update], (update, loss, straight[update])


def test_every_saved_file_carries_its_run_and_update(runs):
    a0, a1, a10 = (stamp_of(runs / "a" / "checkpoint_last-rank-0.pt"), stamp_of(runs / "a" / "checkpoint_last-rank-1.pt"),
                   stamp_of(runs / "a10-rank-1.pt"))
    b0 = stamp_of(runs / "b" / "checkpoint_last-rank-0.pt")
    assert a0 == a1 and a0["num_updates"] == 20
    assert a10 == {"run_id": a0["run_id"], "num_updates": 10}  # the resumed run keeps its id
    assert b0["run_id"] != a0["run_id"] and b0["num_updates"] == 10


def _mixed(tmp_path, rank0, rank1, name="checkpoint_last"):
    shutil.copy(rank0, tmp_path / f"{name}-rank-0.pt")
    shutil.copy(rank1, tmp_path / f"{name}-rank-1.pt")


def _assert_refused(result, *fragments):
    assert result.returncode != 0
    # torchrun prefixes each worker's lines with "[rankN]: ".
    errors = {message for message in error_messages(result.stderr) if MISMATCH in message}
    assert len(errors) == 1, result.stderr[-3000:]  # the same one line from every worker
    error = errors.pop()
    for fragment in fragments:
        assert fragment in error, error


@pytest.mark.parametrize("case", ["updates 20 and 10", pytest.param("two runs", marks=pytest.mark.slow)])
def test_resume_from_files_that_do_not_belong_together_is_refused(data_bin, runs, tmp_path, case):
    a, b = runs / "a", runs / "b"
    if case == "updates 20 and 10":
        _mixed(tmp_path, a / "checkpoint_last-rank-0.pt", runs / "a10-rank-1.pt")
        reason = "(different updates)"
    else:
        _mixed(tmp_path, b / "checkpoint_last-rank-0.pt", runs / "a10-rank-1.pt")
        reason = "(different runs)"
    result = torchrun_train(2, data_bin, tmp_path, *COMMON, "--max-update", "30", check=False)
    _assert_refused(result, reason, "checkpoint_last-rank-0.pt", "checkpoint_last-rank-1.pt")
    assert "num_updates=" not in result.stdout + result.stderr  # no step was taken


@pytest.mark.slow
def test_restore_file_from_two_runs_is_refused(data_bin, runs, tmp_path):
    _mixed(tmp_path, runs / "b" / "checkpoint_last-rank-0.pt", runs / "a10-rank-1.pt", name="mixed")
    result = torchrun_train(2, data_bin, tmp_path / "save", *COMMON, "--max-update", "30",
                            "--restore-file", str(tmp_path / "mixed.pt"), check=False)
    _assert_refused(result, "(different runs)", "mixed-rank-0.pt", "mixed-rank-1.pt")


def test_eval_lm_on_files_of_two_runs_is_refused(data_bin, runs, tmp_path):
    _mixed(tmp_path, runs / "b" / "checkpoint_last-rank-0.pt", runs / "a10-rank-1.pt", name="mixed")
    os.environ["OMP_NUM_THREADS"] = "1"
    result = run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 os.path.join(BIN, "fairseq-eval-lm"), str(data_bin / "bin"), "--path", str(tmp_path / "mixed.pt"),
                 *EVAL, "--distributed-backend", "gloo", check=False)
    _assert_refused(result, "(different runs)", "mixed-rank-0.pt", "mixed-rank-1.pt")
    assert "Perplexity" not in result.stdout + result.stderr


@pytest.mark.slow
def test_eval_lm_with_one_workers_file_damaged_stops_every_worker_with_one_line(data_bin, runs, tmp_path):
    """Each worker reads its own file before the first collective: worker 1's empty file stops both."""
    shutil.copy(runs / "a" / "checkpoint_last-rank-0.pt", tmp_path / "model-rank-0.pt")
    (tmp_path / "model-rank-1.pt").write_bytes(b"")
    os.environ["OMP_NUM_THREADS"] = "1"
    result = run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 os.path.join(BIN, "fairseq-eval-lm"), str(data_bin / "bin"), "--path", str(tmp_path / "model.pt"),
                 *EVAL, "--distributed-backend", "gloo", check=False)
    assert result.returncode != 0
    assert error_messages(result.stderr) == {f"fairseq_base: error: {tmp_path / 'model-rank-1.pt'} is empty (0 bytes): "
                                             f"an interrupted copy or save; restore it from its source"}
    assert workers_stderr(result.stderr).count("fairseq_base: error:") == 2, result.stderr[-3000:]  # both workers
    assert "Connection closed" not in result.stderr and "Perplexity" not in result.stdout + result.stderr

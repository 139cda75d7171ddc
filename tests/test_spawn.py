"""fairseq's one-process-per-device launch: `--distributed-world-size N` without torchrun, where
fairseq spawns one process per GPU with torch.multiprocessing. On a machine without CUDA devices
the plugin spawns N gloo processes on the CPU, so that this launch path is tested here: what
the processes are handed must pickle (eval-lm's replaced main included), and the plugin's
adjustments must be in force in them."""

import os

import pytest

from fairseq_runs import BIN, EVAL, TINY_MODEL, eval_result_loss, losses, run

from fairseq_base.reshard import reshard

# No --distributed-backend: without CUDA devices it is gloo.
SPAWN = ["--cpu", "--distributed-world-size", "2"]


@pytest.fixture(autouse=True)
def one_thread_per_worker(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_spawned_workers_train_resume_and_score_as_one_process(data_bin, tmp_path):
    save_dir = tmp_path / "checkpoints"
    train = [os.path.join(BIN, "fairseq-train"), str(data_bin / "bin"), "--user-dir", "fairseq_base", *TINY_MODEL,
             "--base-experts", "2", *SPAWN, "--save-dir", str(save_dir), "--log-interval", "2"]
    # fairseq's default of one DataLoader worker: spawned processes once leaked their semaphores
    first = run(*train, "--max-update", "4", "--num-workers", "1")
    assert sorted(losses(first)) == [2, 4]
    assert "leaked semaphore" not in first.stderr, first.stderr[-2000:]
    resumed = run(*train, "--max-update", "8")
    log = resumed.stdout + resumed.stderr
    assert "checkpoint_last-rank-0.pt (epoch 1 @ 4 updates)" in log, log[-3000:]
    assert sorted(losses(resumed)) == [6, 8]
    assert sorted(p.name for p in save_dir.glob("checkpoint_last*")) == ["checkpoint_last-rank-0.pt",
                                                                         "checkpoint_last-rank-1.pt"]

    reshard(str(save_dir / "checkpoint_last-rank-0.pt"), 1, str(tmp_path / "one.pt"))
    one = run("fairseq-eval-lm", str(data_bin / "bin"), "--path", str(tmp_path / "one.pt"), *EVAL)
    spawned = run("fairseq-eval-lm", str(data_bin / "bin"), "--path", str(save_dir / "checkpoint_last.pt"), *EVAL,
                  *SPAWN)
    assert "Evaluated" in spawned.stdout + spawned.stderr and "on all 2 workers" in spawned.stdout + spawned.stderr
    assert "leaked semaphore" not in resumed.stderr + spawned.stderr
    assert abs(eval_result_loss(spawned) - eval_result_loss(one)) < 1e-4


@pytest.mark.slow
def test_a_workers_one_line_error_ends_the_output(data_bin, tmp_path):
    """Raised in the spawned workers (not before launch): torch hands the parent their
    tracebacks, and the parent prints the line instead, last, with the exit code kept."""
    result = run(os.path.join(BIN, "fairseq-train"), str(data_bin / "bin"), "--user-dir", "fairseq_base",
                 *TINY_MODEL, "--base-experts", "3", *SPAWN, "--save-dir", str(tmp_path / "run"),
                 "--max-update", "1", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.rstrip("\n").splitlines()[-1] == (
        "fairseq_base: error: --base-experts 3 cannot be split over the 2 workers of an expert-parallel group; use a "
        "multiple of 2 (or 0 for one expert per worker), or a --base-expert-parallel-size that divides 3")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_amp_with_experts_on_several_workers_is_one_line(data_bin, tmp_path):
    """torch's GradScaler skips a step from each worker's own overflow check: refused before launch."""
    result = run(os.path.join(BIN, "fairseq-train"), str(data_bin / "bin"), "--user-dir", "fairseq_base",
                 *TINY_MODEL, "--base-experts", "2", *SPAWN, "--amp", "--save-dir", str(tmp_path),
                 "--max-update", "1", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fairseq_base: error:")]
    assert len(errors) == 1 and "--amp with experts on several workers" in errors[0], result.stderr[-2000:]
    assert "--bf16" in errors[0] and "--fp16" in errors[0]
    assert not list(tmp_path.iterdir())

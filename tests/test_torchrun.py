"""fairseq-train under torchrun with gloo on CPU: the guards on DDP backends and expert counts."""

import pytest

from fairseq_runs import error_messages, torchrun_train

pytestmark = pytest.mark.slow


def test_averaging_ddp_backend_is_refused(data_bin, tmp_path):
    result = torchrun_train(2, data_bin, tmp_path, "--ddp-backend", "slowmo", "--max-update", "2",
                            check=False)
    assert result.returncode != 0
    assert "fairseq_base: error: --ddp-backend slowmo would average the experts" in result.stderr
    assert "use --ddp-backend c10d or legacy_ddp" in result.stderr
    assert not list(tmp_path.glob("checkpoint*"))


def test_expert_count_not_divisible_by_workers_is_refused(data_bin, tmp_path):
    result = torchrun_train(2, data_bin, tmp_path, "--base-experts", "3", "--ddp-backend", "legacy_ddp",
                            "--max-update", "2", check=False)
    assert result.returncode != 0
    line = "fairseq_base: error: --base-experts 3 cannot be split over the 2 workers of an expert-parallel group"
    assert line in result.stderr
    # torch's agent prints its summary after the workers' line (it runs none of the plugin's code):
    # each worker's row there gives the line (its error file), not a link to torch's docs
    summary = result.stderr[result.stderr.index("ChildFailedError"):]
    assert f"traceback : {line}" in summary and "To enable traceback" not in summary, summary


def test_fully_sharded_with_experts_is_one_line(data_bin, tmp_path):
    result = torchrun_train(2, data_bin, tmp_path, "--ddp-backend", "fully_sharded", "--max-update", "2",
                            check=False)
    assert result.returncode != 0
    assert error_messages(result.stderr) == {
        "fairseq_base: error: --ddp-backend fully_sharded would shard the experts like shared parameters (and needs "
        "fairscale); use --ddp-backend c10d or legacy_ddp"}, result.stderr[-2000:]
    assert "fairscale with: pip install" not in result.stderr  # fairseq's import error never comes

"""errors.py: the one-line error, as each launch path hands it on (no process group needed)."""

import json
import sys
import traceback

from fairseq_base.checkpoints import CheckpointError
from fairseq_base.errors import BaseLayerConfigError, install_excepthook, raised_by_a_worker


def worker_trace(error):
    """The text torch's spawn sends the parent for a worker that raised ``error``."""
    try:
        raise error
    except Exception:
        return "\n\n-- Process 1 terminated with the following error:\n" + traceback.format_exc()


def test_a_workers_one_line_error_is_raised_again_and_any_other_error_is_not():
    for error in (BaseLayerConfigError("--base-experts 3 cannot be split"), CheckpointError("a damaged file")):
        again = raised_by_a_worker(worker_trace(error))
        assert isinstance(again, BaseLayerConfigError) and str(again) == str(error)
    assert raised_by_a_worker(worker_trace(ValueError("not ours"))) is None
    assert raised_by_a_worker(worker_trace(RuntimeError("fairseq_base.errors.BaseLayerConfigError: x"))) is None


def test_under_torchrun_the_line_is_the_workers_error_file_for_the_agents_summary(monkeypatch, tmp_path, capsys):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    install_excepthook()
    sys.excepthook(BaseLayerConfigError, BaseLayerConfigError("use --base-experts 2"), None)
    assert capsys.readouterr().err == "fairseq_base: error: use --base-experts 2\n"
    written = json.loads(error_file.read_text())["message"]
    # torch's agent shows "py_callstack" as the worker's traceback in its summary
    assert written["message"] == written["extraInfo"]["py_callstack"] == "fairseq_base: error: use --base-experts 2"

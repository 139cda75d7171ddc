"""Every command block of README.md and docs/*.md runs as written: the ``docs`` tier, which
.ci/run runs (``python3 -m pytest -q -m docs tests``). The blocks of each page run in order, in
a directory of their own that holds this checkout's code (``fairseq_base``, ``configs``,
``scripts``) and a fresh copy of the quick run's data (``data-bin/brown``), so each page starts
where a reader who ran the quick run stands. A CPU run shrinks only the values in ``SHRINK``,
nothing else. A block that cannot run here says why in a comment just above it,
``<!-- not run here: REASON -->``; its options are still checked (``test_docs.py``)."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from command_server import stand_in

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs"))
                                   if name.endswith(".md"))
BLOCK = re.compile(r"(?:<!-- not run here: (?P<why>.*?) -->\n)?```(?P<language>bash|python)\n(?P<code>.*?)```", re.S)
# The values a CPU run must shrink: (pattern, replacement, why). Nothing else of a command changes.
SHRINK = [
    (r"--max-update \d+", "--max-update 2", "two updates show that a training command runs"),
    (r"(fairseq-hydra-train [^\n]*)", r"\1 optimization.max_update=2", "the same, for a Hydra config"),
    (r"bash scripts/quickrun\.sh", "UPDATES=2 bash scripts/quickrun.sh", "the quick run's own setting"),
    (r"bash scripts/setup\.sh && ", "", "installing is .ci/run's first step, before this tier"),
]


def blocks(document):
    """[(line, language, code, why it is not run or None)] of the command blocks of ``document``."""
    with open(os.path.join(REPO, document)) as f:
        content = f.read()
    return [(content.count("\n", 0, m.start("code")) + 1, m["language"], m["code"], m["why"])
            for m in BLOCK.finditer(content)]


def shrunk(code):
    for pattern, replacement, _ in SHRINK:
        code = re.sub(pattern, replacement, code)
    return code


def test_every_block_runs_or_says_why_not():
    found = {document: blocks(document) for document in DOCUMENTS}
    assert sum(len(b) for b in found.values()) >= 12, "no command blocks found"
    for document, its_blocks in found.items():
        for line, _, _, why in its_blocks:
            assert why is None or why.strip(), f"{document}:{line}: 'not run here' without a reason"


def test_shrinking_changes_only_the_values_it_names():
    assert shrunk("fairseq-train data --max-update 400 --lr 0.002\nfairseq-hydra-train --config-name x task.data=d") == (
        "fairseq-train data --max-update 2 --lr 0.002\n"
        "fairseq-hydra-train --config-name x task.data=d optimization.max_update=2")
    assert shrunk("bash scripts/setup.sh && bash scripts/quickrun.sh") == "UPDATES=2 bash scripts/quickrun.sh"


@pytest.fixture(scope="session")
def brown(tmp_path_factory):
    """The quick run's data, data-bin/brown: this checkout's if the quick run left it, else fetched
    and binarized as the quick run does (scripts/prepare_brown.py, npm)."""
    if os.path.exists(os.path.join(REPO, "data-bin", "brown", "test.bin")):
        return os.path.join(REPO, "data-bin", "brown")
    out = str(tmp_path_factory.mktemp("data") / "brown")
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "prepare_brown.py"), "--out", out], check=True,
                   capture_output=True, timeout=900)
    return out


def runnable_documents():
    return [document for document in DOCUMENTS if any(why is None for *_, why in blocks(document))]


@pytest.mark.docs
@pytest.mark.parametrize("document", runnable_documents())
def test_the_commands_of_a_page_run_as_written(document, brown, tmp_path):
    for name in ("fairseq_base", "configs", "scripts"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    shutil.copytree(brown, tmp_path / "data-bin" / "brown")
    # `$(which fairseq-train)` must name a Python script (a pyenv shim is a bash script torchrun cannot
    # run): the command server's stand-in (conftest), else this Python's own.
    served = stand_in("fairseq-train")
    env = {**os.environ, "PATH": os.pathsep.join([*([os.path.dirname(served)] if served else []),
                                                  os.path.dirname(sys.executable), os.environ["PATH"]])}
    for line, language, code, why in blocks(document):
        if why is not None:
            continue
        command = ["bash", "-euo", "pipefail", "-c", shrunk(code)] if language == "bash" else \
            [sys.executable, "-c", code]
        try:
            result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:  # a watchdog, not a speed bound
            pytest.fail(f"{document}:{line}: the block hung (no exit after 900 s)")
        assert result.returncode == 0, (f"{document}:{line}: the block failed\n{shrunk(code)}\n"
                                        f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")

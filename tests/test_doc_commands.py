"""Every command block of README.md and docs/*.md runs as written and prints what its page says:
the ``docs`` tier, which .ci/run runs (``python3 -m pytest -q -m docs tests``). The blocks of each
page run in order, in a directory of their own that holds this checkout's code (``fairseq_base``,
``configs``, ``scripts``) and a fresh copy of the quick run's data (``data-bin/brown``), so each
page starts where a reader who ran the quick run stands; a page marked
``<!-- builds on: README.md -->`` runs after the README's blocks, in the README's directory, as a
reader who followed the README would. A CPU run shrinks only the values in ``SHRINK``, nothing
else. A block that cannot run here says why in a comment just above it,
``<!-- not run here: REASON -->``; its options are still checked (``test_docs.py``).

What a page says a block prints stands in a comment just above it, ``<!-- expect: CLAIM; ... -->``,
and the tier checks it (``broken_claims``): ``same perplexity`` (every perplexity the block prints
is the same), ``writes PATH, ...`` (the files exist after it), ``prints TEXT``. Every block also
fails where it prints a perplexity over 0 tokens."""

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
BLOCK = re.compile(r"(?:<!-- expect: (?P<expect>.*?) -->\n)?(?:<!-- not run here: (?P<why>.*?) -->\n)?"
                   r"```(?P<language>bash|python)\n(?P<code>.*?)```", re.S)
BUILDS_ON_README = "<!-- builds on: README.md -->"
PERPLEXITY = re.compile(r"Perplexity: ([0-9.]+)")
# The values a CPU run must shrink: (pattern, replacement, why). Nothing else of a command changes.
SHRINK = [
    (r"--max-update \d+", "--max-update 2", "two updates show that a training command runs"),
    (r"(fairseq-hydra-train [^\n]*)", r"\1 optimization.max_update=2", "the same, for a Hydra config"),
    (r"bash scripts/quickrun\.sh", "UPDATES=2 bash scripts/quickrun.sh", "the quick run's own setting"),
    (r"bash scripts/setup\.sh && ", "", "installing is .ci/run's first step, before this tier"),
]


def text(document):
    with open(os.path.join(REPO, document)) as f:
        return f.read()


def blocks(document):
    """[(line, language, code, why it is not run or None, its claims or None)] of the command
    blocks of ``document``."""
    content = text(document)
    return [(content.count("\n", 0, m.start("code")) + 1, m["language"], m["code"], m["why"], m["expect"])
            for m in BLOCK.finditer(content)]


def broken_claims(claims, printed, folder):
    """What is false of ``claims`` (``<!-- expect: ... -->``) for a block that printed ``printed``
    in ``folder``, and a perplexity over 0 tokens, which no page claims."""
    broken = [f"a perplexity over 0 tokens: {line.strip()}" for line in printed.splitlines()
              if re.search(r"Evaluated 0 tokens", line)]
    for claim in [c.strip() for c in (claims or "").split(";") if c.strip()]:
        if claim == "same perplexity":
            found = PERPLEXITY.findall(printed)
            if len(found) < 2 or len(set(found)) > 1:
                broken.append(f"the page says the same perplexity; printed {found}")
        elif claim.startswith("writes "):
            missing = [path.strip() for path in claim[len("writes "):].split(",")
                       if not os.path.exists(os.path.join(folder, path.strip()))]
            broken += [f"the page says it writes {path}; it does not exist" for path in missing]
        elif claim.startswith("prints "):
            if claim[len("prints "):] not in printed:
                broken.append(f"the page says it prints {claim[len('prints '):]!r}; it does not")
        else:
            broken.append(f"unknown claim {claim!r}: same perplexity, writes PATH, ..., or prints TEXT")
    return broken


def test_a_false_claim_fails_and_a_true_one_passes(tmp_path):
    (tmp_path / "model.pt").write_text("")
    assert broken_claims("same perplexity; writes model.pt; prints Perplexity",
                         "| Evaluated 9 tokens\nPerplexity: 117.75\nPerplexity: 117.75\n", tmp_path) == []
    assert broken_claims("same perplexity", "Perplexity: 117.75\nPerplexity: 1.00\n", tmp_path) == [
        "the page says the same perplexity; printed ['117.75', '1.00']"]
    assert broken_claims("writes model.pt, model2-rank-0.pt", "", tmp_path) == [
        "the page says it writes model2-rank-0.pt; it does not exist"]
    assert broken_claims(None, "| Evaluated 0 tokens in 0.0s\n", tmp_path) == [
        "a perplexity over 0 tokens: | Evaluated 0 tokens in 0.0s"]
    assert broken_claims("prints H-0", "nothing", tmp_path) == ["the page says it prints 'H-0'; it does not"]


def shrunk(code):
    for pattern, replacement, _ in SHRINK:
        code = re.sub(pattern, replacement, code)
    return code


def test_every_block_runs_or_says_why_not():
    found = {document: blocks(document) for document in DOCUMENTS}
    assert sum(len(b) for b in found.values()) >= 12, "no command blocks found"
    for document, its_blocks in found.items():
        for line, _, _, why, _ in its_blocks:
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
    return [document for document in DOCUMENTS if any(why is None for *_, why, _ in blocks(document))]


def reading_orders():
    """The pages in the order a reader runs them, each list in one directory: the README, then the
    pages that build on it; every other page alone."""
    runnable = runnable_documents()
    followers = [d for d in runnable if d != "README.md" and BUILDS_ON_README in text(d)]
    return [["README.md", *followers]] + [[d] for d in runnable if d != "README.md" and d not in followers]


def test_pages_that_build_on_the_readme_run_after_it():
    orders = reading_orders()
    assert orders[0][:2] == ["README.md", os.path.join("docs", "checkpoints.md")]
    assert sorted(d for order in orders for d in order) == sorted(runnable_documents())


@pytest.mark.docs
@pytest.mark.parametrize("documents", reading_orders(), ids=" then ".join)
def test_the_commands_of_a_page_run_as_written(documents, brown, tmp_path):
    for name in ("fairseq_base", "configs", "scripts"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    shutil.copytree(brown, tmp_path / "data-bin" / "brown")
    # `$(which fairseq-train)` must name a Python script (a pyenv shim is a bash script torchrun cannot
    # run): the command server's stand-in (conftest), else this Python's own.
    served = stand_in("fairseq-train")
    env = {**os.environ, "PATH": os.pathsep.join([*([os.path.dirname(served)] if served else []),
                                                  os.path.dirname(sys.executable), os.environ["PATH"]])}
    for document, (line, language, code, why, claims) in [(d, b) for d in documents for b in blocks(d)]:
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
        broken = broken_claims(claims, result.stdout + result.stderr, tmp_path)
        assert not broken, f"{document}:{line}: " + "; ".join(broken)

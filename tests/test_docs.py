"""The README and docs/ stay true to the code: every test and file they name exists, the README's
options table is what ``python -m fairseq_base.options`` prints, every option in the commands of
its set-up and use sections is one that fairseq or the plugin accepts, and what the code
writes is ignored by git."""

import ast
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
# Paths in the repository that the documents may name: these folders and top-level files.
PATH = re.compile(r"(?<![\w./-])((?:fairseq_base|scripts|tests|configs|docs|\.ci)/[\w./-]*\w|setup\.py|pyproject\.toml)")
TEST = re.compile(r"(tests/test_\w+\.py)?::(\w+)")


def text(document):
    with open(os.path.join(REPO, document)) as f:
        return f.read()


def functions_of(path):
    with open(os.path.join(REPO, path)) as f:
        tree = ast.parse(f.read())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_test_and_file_named_exists(document):
    content, missing = text(document), []
    for path in set(PATH.findall(content)):
        if not glob.glob(os.path.join(REPO, path)) and "*" not in path:
            missing.append(path)
    # "tests/test_x.py::name" and, after it in the same sentence, "::other" of the same file
    current = None
    for match in TEST.finditer(content):
        current = match.group(1) or current
        if current is None or match.group(2) not in functions_of(current):
            missing.append(f"{current}::{match.group(2)}")
    assert not missing, f"{document} names what does not exist: {sorted(set(missing))}"


def test_readme_options_table_is_what_the_options_command_prints(capsys):
    """The command's own function, in this process: its ``python -m`` start is run by the test of
    ``| head`` below."""
    from fairseq_base.options import main
    main([])
    printed = capsys.readouterr().out.strip()
    table = re.search(r"<!-- python -m fairseq_base.options -->\n(.*?)\n<!-- end", text("README.md"), re.S).group(1)
    assert table.strip() == printed
    main(["--text"])
    assert "--base-router (model.base_router, default balanced)" in capsys.readouterr().out


def test_the_upcycle_options_table_lists_every_option_of_the_command():
    from fairseq_base.options import model_fields
    from fairseq_base.upcycle import build_parser
    section = text("docs/checkpoints.md").split("## Start from a dense model")[1].split("\n## ")[0]
    listed = set(re.findall(r"^\| `(--[a-z-]+)`", section, re.M))
    options = {option for action in build_parser()._actions for option in action.option_strings}
    own = {option for option in options if not option.startswith(("--base-", "-h", "--help"))}
    assert listed == own and "| `--base-*` |" in section
    assert {f"--{field.name.replace('_', '-')}" for field in model_fields()} <= options


def test_options_command_piped_into_a_reader_that_stops_early_ends_quietly():
    """``python -m fairseq_base.options --text | head``: no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "fairseq_base.options", "--text"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.close()  # before it prints: its write meets a closed pipe
    assert proc.wait(timeout=120) == 0 and b"Traceback" not in proc.stderr.read()


def commands(markdown):
    """The shell commands in the ``bash`` blocks of a page, those not run on CPU (GPUs, clusters)
    included: continuation lines joined, one per pipeline stage or ``&&``."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0] if line.lstrip().startswith("#") else line
            for part in re.split(r"\||&&|;", line):
                if part.strip():
                    found.append(part.strip())
    return found


def accepted_options(program):
    """The options ``program`` (a fairseq entry point, with this plugin's model) accepts."""
    from fairseq import options
    parsers = {"fairseq-train": options.get_training_parser, "fairseq-eval-lm": options.get_eval_lm_parser,
               "fairseq-interactive": options.get_interactive_generation_parser}
    parser = parsers[program]()
    # The task's (and in training the model's) options join the parser once they are known.
    arch = ["--arch", "transformer_lm_base"] if program == "fairseq-train" else []
    options.parse_args_and_arch(parser, ["data", "--user-dir", os.path.join(REPO, "fairseq_base"), "--task",
                                         "language_modeling", *arch])
    return set(parser._option_string_actions)


def test_commands_use_options_that_exist():
    from fairseq_base.reshard import build_parser
    from fairseq_base.upcycle import build_parser as upcycle_parser
    from fairseq_base.models.transformer_lm_base import TransformerLanguageModelBaseConfig
    checked, unknown = 0, []
    for command in [command for document in DOCUMENTS for command in commands(text(document))]:
        words = shlex.split(command.replace("$(which ", "").replace(")", ""), posix=True)
        for i, word in enumerate(words):
            program = os.path.basename(word)
            if program in ("fairseq-train", "fairseq-eval-lm", "fairseq-interactive"):
                known = accepted_options(program)
            elif program == "fairseq-base-reshard":
                known = set(build_parser()._option_string_actions)
            elif program == "fairseq-base-upcycle":
                known = set(upcycle_parser()._option_string_actions)
            elif program == "fairseq-hydra-train":
                keys = {f"model.{f}" for f in TransformerLanguageModelBaseConfig.__dataclass_fields__}
                name = words[words.index("--config-name") + 1]
                assert os.path.exists(os.path.join(REPO, "configs", f"{name}.yaml")), name
                unknown += [w for w in words if w.startswith("model.") and w.split("=")[0] not in keys]
                checked += 1
                break
            else:
                continue
            unknown += [f"{program} {w}" for w in words[i + 1:] if w.startswith("--") and w.split("=")[0] not in known]
            checked += 1
            break
    assert checked >= 20, "the documents' commands were not found"
    assert not unknown, f"options no program accepts: {unknown}"


def test_what_the_code_writes_is_ignored_by_git():
    if not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    generated = [".venv/bin/python3", "model.pt", "model4-rank-0.pt", "bundle/requirements.txt", "runs/bench/layer.json", "data-bin/brown/train.bin",
                 "checkpoints/checkpoint_last.pt", "outputs/2026-01-01/00-00-00/x", ".hypothesis/examples/x",
                 "fairseq_base/_auction.cpython-311-x86_64-linux-gnu.so", "tests/__pycache__/x.pyc"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *generated], cwd=REPO, capture_output=True,
                            text=True)
    assert sorted(result.stdout.split()) == sorted(generated)

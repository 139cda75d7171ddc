"""The command server (``command_server.py``) runs fairseq's commands as fresh processes would:
the caller's files, directory and exit status, a fresh interpreter where the environment asks for
one, and no command outliving its stand-in nor server the process that started it."""

import os
import signal
import subprocess
import sys
import time

import fairseq  # noqa: F401  as in the suite, where test modules import it: it sets KMP_* in this process
import pytest

import command_server
from fairseq_runs import TINY_MODEL

pytestmark = pytest.mark.skipif(not command_server.stand_in("fairseq-train"), reason="FRESH_PROCESSES=1: no server")


def commands_running():
    """The pids of the commands the server is running (its children)."""
    server = str(command_server.server.pid)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = f.read().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        if parent == server:
            found.append(int(pid))
    return found


def wait_for(condition, what, seconds=120):
    """A watchdog, not a speed bound."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"hung: {what} after {seconds} s")
        time.sleep(0.1)


def test_a_served_command_writes_to_the_callers_files_in_its_directory_and_exits_with_its_status(tmp_path):
    (tmp_path / "train.txt").write_text("a b c\nb c\n")
    (tmp_path / "log.txt").write_text("earlier\n")
    # Through a shell, as the docs' blocks run: >>, 2>&1 and $? mean what they mean for a fresh process.
    script = ("fairseq-preprocess --only-source --trainpref train.txt --destdir bin --workers 1 >> log.txt 2>&1; "
              "echo status $? >> log.txt; fairseq-preprocess --bogus 2>> log.txt; echo status $? >> log.txt")
    subprocess.run(["bash", "-c", script], cwd=tmp_path, check=True, timeout=600)
    log = (tmp_path / "log.txt").read_text()
    assert log.startswith("earlier\n") and "Wrote preprocessed data to bin" in log, log
    assert (tmp_path / "bin" / "dict.txt").read_text().startswith("b 2\nc 2\na 1\n")
    assert "\nstatus 0\nusage: fairseq-preprocess" in log, log
    assert log.endswith("\nfairseq-preprocess: error: unrecognized arguments: --bogus\nstatus 2\n"), log


def test_a_command_whose_interpreter_would_start_differently_starts_fresh(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("print('a fresh interpreter')\n")
    fresh = subprocess.run(["fairseq-preprocess", "--help"], env={**os.environ, "PYTHONPATH": str(tmp_path)},
                           capture_output=True, text=True, timeout=600)
    served = subprocess.run(["fairseq-preprocess", "--help"], capture_output=True, text=True, timeout=600)
    assert fresh.stdout.startswith("a fresh interpreter\nusage: fairseq-preprocess")
    assert served.stdout.startswith("usage: fairseq-preprocess")


def test_a_command_takes_its_stand_ins_signals_and_ends_with_it(data_bin, tmp_path):
    train = ["fairseq-train", str(data_bin / "bin"), "--user-dir", "fairseq_base", "--cpu", *TINY_MODEL,
             "--max-update", "100000", "--save-dir", str(tmp_path)]
    for stop, status in ((signal.SIGTERM, -signal.SIGTERM), (signal.SIGKILL, -signal.SIGKILL)):
        before = set(commands_running())
        stand_in = subprocess.Popen(train, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:  # a stand-in that ran the command fresh (not served) is the command: it must not outlive the test
            wait_for(lambda: set(commands_running()) - before, "no command started in the server")
            command = (set(commands_running()) - before).pop()
            stand_in.send_signal(stop)
            assert stand_in.wait(timeout=120) == status  # SIGTERM: forwarded, and the command died of it
        finally:
            stand_in.kill()
        wait_for(lambda: command not in commands_running(), f"the command outlived its stand-in ({stop.name})")


def test_a_server_ends_with_the_process_that_started_it_even_during_its_imports(tmp_path):
    started = subprocess.run([sys.executable, "-c", "import sys, command_server; "
                              f"command_server.start({str(tmp_path)!r}); print(command_server.server.pid)"],
                             cwd=os.path.dirname(command_server.__file__), capture_output=True, text=True,
                             check=True, timeout=600)
    server = int(started.stdout)
    wait_for(lambda: not os.path.exists(f"/proc/{server}") or open(f"/proc/{server}/stat").read().split()[2] == "Z",
             "the server outlived the process that started it")

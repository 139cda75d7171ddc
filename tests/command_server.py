"""fairseq's commands without their start-up. Importing torch and fairseq costs 5-8 s per process
on 2 cores, and the suite runs hundreds of fairseq commands; a server process imports them once
and forks a child per command, which runs the command's console-script function as a fresh
process would: its own argv, directory, environment, CPU affinity, stdin, stdout and stderr, exit
status and signals.

Every fairseq command of a test run reaches the server through a stand-in of its console script,
in a folder that ``start`` puts first on PATH (for ``run``, the docs' command blocks and the
scripts the tests run alike). The stand-in (``client``) hands the server its arguments and its
own stdin, stdout and stderr (``SCM_RIGHTS``: the same open files, so pipes, appends and
``2>&1`` behave as they would), forwards SIGINT and SIGTERM to the command, and exits with its
status. If the stand-in dies, the server kills the command and what it started.

What a fresh process would do differently runs as one: a command whose environment changes what
an interpreter reads at start (``PYTHONPATH``, ``LD_PRELOAD``, ...) is started fresh, as is any
command when the server is not there. The server never imports the plugin: a child imports it
through --user-dir as a fresh process does, so runs without it stay without it. Processes that a
command starts (fairseq's spawn launch, torchrun) pay their start-up as before.

Protocol, one connection per command: the stand-in sends a JSON line {argv, cwd, env, affinity}
with its fds 0, 1 and 2; the server answers "fresh" (run it as a fresh process) or "pid N" when
the child exists, then "exit N" when it has ended (N < 0: killed by signal -N)."""

import json
import os
import select
import signal
import socket
import sys

ADDRESS = "FAIRSEQ_COMMAND_SERVER"  # the server's socket, in the environment of the tests and what they run
# Console scripts served: name -> (module, function), from fairseq's entry points.
COMMANDS = {"fairseq-train": ("fairseq_cli.train", "cli_main"), "fairseq-eval-lm": ("fairseq_cli.eval_lm", "cli_main"),
            "fairseq-generate": ("fairseq_cli.generate", "cli_main"),
            "fairseq-interactive": ("fairseq_cli.interactive", "cli_main"),
            "fairseq-preprocess": ("fairseq_cli.preprocess", "cli_main"),
            "fairseq-hydra-train": ("fairseq_cli.hydra_train", "cli_main")}
BIN = os.path.dirname(sys.executable)  # the real console scripts
# Read by the interpreter, torch or OpenMP at start: a command whose value differs from the
# server's starts fresh. The thread counts are the exception: the child sets them.
AT_START = ("PYTHON", "LD_", "OMP_", "KMP_", "GOMP_", "MKL_", "TORCH", "PYTORCH", "CUDA", "LOGLEVEL")
THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
HANDLED = ("PYTHONUNBUFFERED", *THREADS, "TORCHELASTIC_", "TORCH_NCCL_")  # torchrun's, read when used
server = None  # the server this process started (``start``)
STAND_INS = "bin"  # the stand-ins' folder, beside the server's socket


def start(workdir):
    """Start a server for this process (it ends when this process does) and write the stand-ins;
    returns the stand-ins' folder, which the caller puts first on PATH. The socket listens before
    the server has imported anything: a command sent meanwhile waits for it."""
    import subprocess
    global server
    address = os.path.join(workdir, "server.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    listener.listen(64)
    here = os.path.dirname(os.path.abspath(__file__))
    program = (f"import sys; sys.path.insert(0, {here!r}); import command_server as s; sys.path.remove({here!r}); "
               f"s.serve(__import__('socket').socket(fileno={listener.fileno()}), {os.getpid()})")
    with open(os.path.join(workdir, "server.log"), "w") as log:
        server = subprocess.Popen([sys.executable, "-c", program], pass_fds=[listener.fileno()],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=workdir)
    listener.close()
    stand_ins = os.path.join(workdir, STAND_INS)
    os.makedirs(stand_ins)
    for name in COMMANDS:  # Python scripts, as the real ones: torchrun runs `$(which fairseq-train)` with Python
        path = os.path.join(stand_ins, name)
        with open(path, "w") as f:  # -S: no site packages to scan, the stand-in needs the standard library only
            f.write(f"#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {here!r})\nimport command_server\n"
                    f"command_server.client({name!r})\n")
        os.chmod(path, 0o755)
    os.environ[ADDRESS] = address
    return stand_ins


def stand_in(name):
    """The stand-in of console script ``name`` where this process started a server, else None."""
    if name in COMMANDS and os.environ.get(ADDRESS):
        return os.path.join(os.path.dirname(os.environ[ADDRESS]), STAND_INS, name)
    return None


def client(name):
    """The stand-in of console script ``name``: run it in the server, or fresh where it cannot."""
    real = os.path.join(BIN, name)
    connection = socket.socket(socket.AF_UNIX)
    try:
        connection.connect(os.environ[ADDRESS])
        if sys.stdout.write_through:  # python -u, as torchrun runs its workers
            os.environ["PYTHONUNBUFFERED"] = "1"
        request = {"argv": [real, *sys.argv[1:]], "cwd": os.getcwd(), "env": dict(os.environ),
                   "affinity": sorted(os.sched_getaffinity(0))}
        socket.send_fds(connection, [(json.dumps(request) + "\n").encode()], [0, 1, 2])
        replies = connection.makefile()
        answer = replies.readline().split()
    except (KeyError, OSError):
        answer = ["fresh"]  # no server: this process becomes the command
    if answer[:1] != ["pid"]:
        os.execv(real, [real, *sys.argv[1:]])
    pid = int(answer[1])
    for forwarded in (signal.SIGINT, signal.SIGTERM):
        signal.signal(forwarded, lambda number, frame: os.kill(pid, number))
    reply = replies.readline().split()
    code = int(reply[1]) if reply and reply[0] == "exit" else 1
    if code < 0:  # die as the command did, so that the caller reads the same status
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


def serve(listener, starter):
    """Accept commands and fork a child for each; report each child's pid and exit status, and kill
    the child (with what it started) whose stand-in went away. One thread only: forking a process
    that runs threads is unsafe. Ends when the process that started it does."""
    started = dict(os.environ)  # importing torch adds to it
    for module, _ in COMMANDS.values():
        __import__(module)
    children = {}  # pid -> connection
    while os.getppid() == starter:  # not once the process that started it has ended, even during the imports
        ready, _, _ = select.select([listener, *children.values()], [], [], 0.05)
        for ready_one in ready:
            if ready_one is listener:
                connection, _ = listener.accept()
                try:
                    pid = _fork(connection, started, [listener, *children.values()])
                except (OSError, ValueError, KeyError):  # a request cut short: its stand-in reads no pid, runs fresh
                    connection.close()
                    continue
                if pid:
                    children[pid] = connection
            elif not ready_one.recv(1):  # the stand-in is gone: so is its command
                pid = next(pid for pid, connection in children.items() if connection is ready_one)
                _kill_group(pid)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = children.pop(pid)
            try:
                connection.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:
                pass
            connection.close()
    for pid in children:
        _kill_group(pid)


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _fork(connection, started, others):
    """Read the request on ``connection`` and fork its child; the child's pid, or None if the
    command must start fresh (the connection is then answered and closed). ``started``: the
    server's environment as it started."""
    data, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
    while not data.endswith(b"\n"):
        more = connection.recv(1 << 16)
        if not more:
            break
        data += more
    request = json.loads(data)
    # A value that the server's own imports set (importing fairseq imports scikit-learn, which sets
    # KMP_*) is what the command's imports would set: the caller has it from the same imports.
    differs = [key for key in {*request["env"], *started} if key.startswith(AT_START) and not key.startswith(HANDLED)
               and request["env"].get(key) not in (started.get(key), os.environ.get(key))]
    if differs or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        connection.sendall(b"fresh\n")
        connection.close()
        return None
    pid = os.fork()
    if pid == 0:
        for other in [connection, *others]:
            other.close()
        _child(request, fds, {key: value for key, value in os.environ.items() if key not in started})
    for fd in fds:
        os.close(fd)
    connection.sendall(f"pid {pid}\n".encode())
    return pid


def _child(request, fds, imported):
    """In the forked child: become the command, run it, and exit as its console script would (the
    SystemExit ends the server's loop, and with it the child's interpreter: the atexit handlers
    run, fairseq's TensorBoard writers flush there, and stdout and stderr are flushed).
    ``imported``: what the server's imports added to its environment."""
    os.setpgid(0, 0)  # a group of its own: killed with what it starts if its stand-in dies
    for fd, passed in zip((0, 1, 2), fds):
        os.dup2(passed, fd)
        os.close(passed)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for key, value in imported.items():  # what importing torch set, as it would have in a fresh process
        os.environ.setdefault(key, value)
    os.sched_setaffinity(0, request["affinity"])
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))  # stderr is line-buffered either way
    sys.stdout.reconfigure(line_buffering=unbuffered or sys.stdout.isatty(), write_through=unbuffered)
    sys.stderr.reconfigure(write_through=unbuffered)
    threads = [int(os.environ[name]) for name in THREADS if os.environ.get(name, "").isdigit()]
    if threads:  # a fresh process reads these at start; the server started without them
        import torch
        torch.set_num_threads(min(threads))
    sys.argv = list(request["argv"])
    # As a fresh console script: its folder first on sys.path, and it as __main__'s file, so that
    # processes the command spawns (fairseq's one-process-per-device launch) run it first and
    # import the fairseq module that configures their logging.
    sys.path[0] = os.path.dirname(sys.argv[0])
    sys.modules["__main__"].__file__ = sys.argv[0]
    module, function = COMMANDS[os.path.basename(sys.argv[0])]
    code = 0
    try:
        result = getattr(__import__(module, fromlist=[function]), function)()
        code = result if isinstance(result, int) else 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)  # sys.exit("message"), as the interpreter prints it
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    raise SystemExit(code)

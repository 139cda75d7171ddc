"""User errors: one line that names the option and the fix, instead of a stack trace.

The line ends the output on every launch path: in one process and under torchrun the worker's
``sys.excepthook`` prints it; under fairseq's spawn launch, where torch hands the parent each
failed worker's traceback as text, the parent raises the worker's error again
(``raised_by_a_worker``) and prints the line itself."""

import contextlib
import json
import os
import sys
import time

from hydra.errors import CompactHydraException


class BaseLayerConfigError(ValueError, CompactHydraException):
    """A bad option or an incompatible checkpoint; the message says which and how to fix it.

    A compact exception to Hydra (fairseq-hydra-train), which prints a traceback for what its
    job raises, but the message alone (after "Error executing job with overrides: [...]") for
    these."""


def raised_by_a_worker(trace: str):
    """The BaseLayerConfigError (or subclass) a spawned worker raised, from the traceback text
    torch's spawn sends back (its last line is "module.Class: message"); None for any other error."""
    last = trace.rstrip("\n").rsplit("\n", 1)[-1]
    name, _, message = last.partition(": ")
    module, _, class_name = name.rpartition(".")
    raised = getattr(sys.modules.get(module), class_name, None)
    if isinstance(raised, type) and issubclass(raised, BaseLayerConfigError) and message:
        return BaseLayerConfigError(message)
    return None


def tell_torchrun(line: str) -> None:
    """Under torchrun, write the worker's error file as torch's ``@record`` would, so that the
    agent's summary gives this line as the worker's failure rather than a link to torch's docs.
    (The agent runs none of the plugin's code: its summary still follows the line.)"""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError), open(path, "w") as error_file:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                   "timestamp": str(int(time.time()))}}}, error_file)


def install_excepthook() -> None:
    """Print uncaught BaseLayerConfigErrors as one line; leave every other exception alone."""
    previous = sys.excepthook
    if getattr(previous, "fairseq_base", False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, BaseLayerConfigError):
            line = f"fairseq_base: error: {exc}"
            # One write, line and newline together: workers sharing a terminal cannot split it.
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            tell_torchrun(line)
        else:
            previous(exc_type, exc, tb)

    hook.fairseq_base = True
    sys.excepthook = hook

"""User errors: one line that names the option and the fix, instead of a stack trace."""

import sys

from hydra.errors import CompactHydraException


class BaseLayerConfigError(ValueError, CompactHydraException):
    """A bad option or an incompatible checkpoint; the message says which and how to fix it.

    A compact exception to Hydra (fairseq-hydra-train), which prints a traceback for what its
    job raises, but the message alone (after "Error executing job with overrides: [...]") for
    these."""


def install_excepthook() -> None:
    """Print uncaught BaseLayerConfigErrors as one line; leave every other exception alone."""
    previous = sys.excepthook
    if getattr(previous, "fairseq_base", False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, BaseLayerConfigError):
            # One write, line and newline together: workers sharing a terminal cannot split it.
            sys.stderr.write(f"fairseq_base: error: {exc}\n")
            sys.stderr.flush()
        else:
            previous(exc_type, exc, tb)

    hook.fairseq_base = True
    sys.excepthook = hook

"""Faults for the save tests, injected into fairseq-train's workers by putting this folder on
PYTHONPATH (Python imports ``sitecustomize`` at start). Inert unless FAIRSEQ_BASE_FAULT is set:

    FAIRSEQ_BASE_FAULT=KIND:RANK:N   on worker RANK (torchrun's RANK, 0 without it), at the Nth
                                     checkpoint file written (write) or renamed (rename):
    enospc   writing fails as on a full disk (torch.save's RuntimeError)
    kill     the worker dies at once (os._exit) as if killed
"""

import os
import sys

FAULT = os.environ.get("FAIRSEQ_BASE_FAULT")

if FAULT:
    import builtins

    KIND, RANK, AT = FAULT.split(":")
    AT, ON_THIS_WORKER = int(AT), int(os.environ.get("RANK", "0")) == int(RANK)
    calls = {"write": 0, "rename": 0}

    def _hit(operation: str) -> bool:
        calls[operation] += 1
        return ON_THIS_WORKER and calls[operation] == AT

    def _install():
        from fairseq_base.fairseq_patches import saves
        write, commit_replace = saves.StagedFiles.write, os.replace

        def faulty_write(self, obj, filename, async_write=False):
            if KIND == "enospc" and _hit("write"):
                open(self._temporary(filename), "wb").write(b"partial")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos (No space left "
                                   "on device)")
            return write(self, obj, filename, async_write)

        def faulty_replace(source, destination, *args, **kwargs):
            if KIND == "kill" and ".pt.tmp-" in str(source) and _hit("rename"):
                os._exit(9)
            return commit_replace(source, destination, *args, **kwargs)

        saves.StagedFiles.write = faulty_write
        saves.os.replace = faulty_replace

    real_import = builtins.__import__

    def importing(name, *args, **kwargs):  # install once the plugin's save module exists
        module = real_import(name, *args, **kwargs)
        saves = sys.modules.get("fairseq_base.fairseq_patches.saves")
        if not getattr(importing, "done", False) and hasattr(saves, "install"):  # the module ran to its end
            importing.done = True
            _install()
        return module

    builtins.__import__ = importing

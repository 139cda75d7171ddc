"""numpy 2 for fairseq 0.12's language-model datasets.

Replaces: nothing of fairseq's; restores ``np.compat.long``, which numpy 2 removed and
fairseq 0.12's ``TokenBlockDataset`` still uses (fairseq-interactive and the hub's
``sample`` and ``score`` fail on language models without it).
Touches: every model and launch path under numpy 2 (the name is ``int``, as numpy 1 defined
it); nothing under numpy 1.
"""

from types import SimpleNamespace

import numpy as np


def install() -> None:
    if not hasattr(np, "compat"):
        np.compat = SimpleNamespace(long=int)

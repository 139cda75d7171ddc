"""Every adjustment this plugin makes to fairseq, one module per thing it adjusts.

Each module says at its top which fairseq functions it replaces, why, and which models and
launch paths it touches; each replacement is a module-level function that calls fairseq's
(so fairseq's spawn launch can pickle it), accepts what fairseq's accepts (an argparse
Namespace included) and leaves models without experts as fairseq leaves them, unless its
module says otherwise.

| module | adjusts | touches |
|---|---|---|
| ``launch`` | torchrun without CUDA devices, ``--bf16`` without TPUs, options checked before launch, fairseq's lock in spawned workers (no leaked semaphores) | every model, only where fairseq would fail: torchrun on a CPU machine, ``--bf16`` without torch_xla |
| ``ddp`` | DDP backends: experts never averaged, torch's DDP on CPU modules | W > 1 workers; the expert checks: models with experts; the device id: every model on the CPU |
| ``checkpoint_files`` | one file per expert-parallel rank, checks on load and save, run stamps, Namespaces under ``weights_only``, checkpoints of one module per expert read as stacked, a ``--path`` beside ``-rank-*`` files | models with experts; the run stamp (``extra_state``) and the Namespace: every model; the ``--path`` line: any model, where fairseq would fail |
| ``saves`` (and ``save_lock``) | saves all or nothing across files and workers, never of inf or NaN weights; ``crash.pt`` per rank; an explicit ``--restore-file`` must exist; one run per save directory | models with experts, in fairseq-train |
| ``eval_lm`` | fairseq-eval-lm: per-rank files, workers in lockstep, one perplexity, block length | models with experts |
| ``generation`` | fairseq-interactive and fairseq-generate on W workers: each worker's own file, worker 0 reads and prints, the others serve its forwards | models with experts on W > 1 workers |
| ``optimizer`` | gradient norm over shared parameters, expert gradients reduced over replicas, the lossfree bias once per step, ``--amp`` with experts on several workers refused in each worker | models with experts (for others fairseq's norm, nothing to reduce, ``--amp`` as before) |
| ``routing_churn`` | the probe batch of every validation | models with expert layers of this plugin |
| ``numpy_compat`` | ``np.compat.long`` under numpy 2 | every model under numpy 2 |
"""

from fairseq.distributed import utils as distributed_utils

from fairseq_base.fairseq_patches import (checkpoint_files, ddp, eval_lm, generation, launch, numpy_compat,
                                          optimizer, routing_churn, saves)

ADJUSTMENTS = (launch, ddp, checkpoint_files, saves, eval_lm, generation, optimizer, routing_churn, numpy_compat)
INSTALLED = "fairseq_base_adjustments_installed"  # marked on fairseq, which every copy of the plugin shares


def install() -> None:
    """Install every adjustment, once per process however often (or under whatever name) the plugin is imported."""
    if getattr(distributed_utils, INSTALLED, False):
        return
    for adjustment in ADJUSTMENTS:
        adjustment.install()
    setattr(distributed_utils, INSTALLED, True)

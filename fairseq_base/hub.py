"""The hub interface of transformer_lm_base (``from_pretrained``, ``sample``, ``generate``,
``score``) on W workers of a process group, each holding only its experts.

Each worker loads its own file of a checkpoint saved as one file per expert-parallel rank
(NAME-rank-*.pt, ``checkpoints.rank_suffix``), and every call of ``generate`` (which ``sample``
and ``score`` make) runs with the other workers' (``lockstep.Together``): every worker calls it
as often, each with prompts of its own, or none, and each gets its own results.
"""

import os

import torch.distributed as dist
from fairseq import hub_utils

from fairseq_base import checkpoints
from fairseq_base.lockstep import Together


def own_checkpoint_file(model_name_or_path: str, checkpoint_file: str) -> str:
    """``checkpoint_file``, or in a process group of W > 1 workers, where it is saved as NAME-rank-*.pt,
    this worker's file of it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return checkpoint_file
    path = os.path.join(model_name_or_path, checkpoint_file)
    checkpoints.refuse_two_kinds(path, "move one of them to another directory, so that the name means one model")
    suffix = checkpoints.rank_suffix([path], dist.get_rank(), dist.get_world_size())
    return checkpoint_file if suffix is None else checkpoint_file[: -len(".pt")] + suffix + ".pt"


class ExpertsHubInterface(hub_utils.GeneratorHubInterface):
    """fairseq's hub interface, whose ``generate`` runs with the other workers' where the experts
    are spread over several."""

    def generate(self, *args, **kwargs):
        with Together(list(self.models)):
            return super().generate(*args, **kwargs)

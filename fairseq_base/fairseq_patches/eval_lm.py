"""fairseq-eval-lm for models with experts: each worker's own file, workers in lockstep, one
perplexity, and blocks as long as the model was trained on.

Replaces:
- ``fairseq_cli.eval_lm.main`` (the command line's and the Python entry point, which also
  takes an argparse Namespace): on W > 1 workers, ``--path NAME.pt`` saved as K files
  ``NAME-rank-{k}.pt`` loads ``NAME-rank-{r % K}.pt`` on worker r (fairseq's suffix rule,
  which eval-lm does not apply by itself; K must divide W). Without --tokens-per-sample on
  the command line, a transformer_lm_base checkpoint is scored in blocks of the length it
  was trained on (fairseq's default, 1024, skips every longer block); a Namespace from a
  Python caller is taken as it is. Each worker reads its own file before the first collective,
  and a file that one worker cannot use stops every worker with the same line.
- ``fairseq_cli.eval_lm.eval_lm``: for models with experts on W > 1 workers, workers run in
  lockstep, a worker out of batches joining the others' all-to-alls with a dummy batch, the
  files they loaded must belong together, and the perplexity printed is the one of all
  workers' tokens together. For every model, a run that scored 0 tokens stops with one line
  naming --tokens-per-sample instead of printing "Perplexity: 1.00" (fairseq skips every block
  longer than the model's positions, and says only "Evaluated 0 tokens").
Both are module-level functions, so that fairseq's spawn launch (one process per GPU) can
pickle ``main`` to its children, which import this plugin when they unpickle it.
Touches: models with experts. For a model without experts, ``main`` only converts a Namespace
as fairseq's does (the suffix applies to files ``NAME-rank-*.pt``, which only models with
experts write) and ``eval_lm`` is fairseq's, with each worker's own perplexity and
``--num-shards``' empty padding batches skipped as fairseq skips them, except that a perplexity
over 0 tokens (fairseq's loss of 0, which it returns for no tokens) stops with one line.
"""

import logging
import os
import sys
from argparse import Namespace

import torch
import torch.distributed as dist
from fairseq_cli import eval_lm as fairseq_eval_lm
from omegaconf import DictConfig

from fairseq_base import checkpoints
from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.fairseq_patches import checkpoint_files
from fairseq_base.fairseq_patches.which_models import as_config, has_experts

logger = logging.getLogger(__name__)
FAIRSEQ_EVAL_LM = fairseq_eval_lm.eval_lm
FAIRSEQ_MAIN = fairseq_eval_lm.main


def rank_suffix_for_eval(cfg, rank: int, workers: int) -> None:
    """Under fairseq-eval-lm (and generation) on W workers, for --path NAME.pt saved as K files
    NAME-rank-{0..K-1}.pt, load NAME-rank-{r % K}.pt (``checkpoints.rank_suffix``)."""
    paths = cfg.common_eval.path.split(os.pathsep) if cfg.get("common_eval") and cfg.common_eval.path else []
    if not cfg.checkpoint.checkpoint_suffix:
        cfg.checkpoint.checkpoint_suffix = checkpoints.rank_suffix(paths, rank, workers) or ""


def read_own_files_together(cfg, workers: int) -> None:
    """Where each of W > 1 workers scores its own ``NAME-rank-{k}.pt``: every worker reads its file
    in full (kept for fairseq's read of it) and the workers gather what each found before any
    collective, so that a file missing, damaged or of another save on one worker stops all of them
    with the same line."""
    suffix = cfg.checkpoint.checkpoint_suffix
    if not suffix or not dist.is_initialized():
        return
    for path in cfg.common_eval.path.split(os.pathsep):
        own = path.replace(".pt", suffix + ".pt")  # fairseq's rule (get_maybe_sharded_checkpoint_filename)
        problem = checkpoint_files.problem_with(checkpoints.gather(checkpoint_files.read_own_file(own, workers)))
        if problem:
            checkpoint_files.READ_AHEAD.clear()
            raise checkpoints.CheckpointError(problem)


def tokens_per_sample_from_checkpoint(cfg) -> None:
    """Score blocks as long as the ones the transformer_lm_base checkpoint was trained on
    (fairseq's default, 1024, skips every block longer than the model's positions)."""
    if not cfg.common_eval.path:
        return
    path = cfg.common_eval.path.split(os.pathsep)[0]
    if cfg.checkpoint.checkpoint_suffix:
        path = path[: -len(".pt")] + cfg.checkpoint.checkpoint_suffix + ".pt"
    saved = checkpoints.saved_config(path) or {}
    model, task = saved.get("model"), saved.get("task")
    if isinstance(model, dict) and isinstance(task, dict) and model.get("_name") == "transformer_lm_base" \
            and "tokens_per_sample" in task:
        if cfg.task.tokens_per_sample != task["tokens_per_sample"]:
            cfg.task.tokens_per_sample = task["tokens_per_sample"]
            logger.info(f"fairseq_base: --tokens-per-sample {cfg.task.tokens_per_sample}, as the checkpoint was "
                        f"trained (pass --tokens-per-sample to choose)")


def main(cfg, **kwargs):
    if not isinstance(cfg, (Namespace, DictConfig)):
        return FAIRSEQ_MAIN(cfg, **kwargs)
    chosen = isinstance(cfg, Namespace) or any(arg.startswith("--tokens-per-sample") for arg in sys.argv)
    cfg = as_config(cfg)
    for path in cfg.common_eval.path.split(os.pathsep) if cfg.common_eval.path else []:
        checkpoints.refuse_two_kinds(path, "move one of them to another directory, so that --path names one model")
    workers = cfg.distributed_training.distributed_world_size
    if workers > 1:
        rank_suffix_for_eval(cfg, cfg.distributed_training.distributed_rank, workers)
        read_own_files_together(cfg, workers)
    if not chosen:
        tokens_per_sample_from_checkpoint(cfg)
    return FAIRSEQ_MAIN(cfg, **kwargs)


def lockstep(batches, models):
    """Yield this worker's batches while any worker has one left; when this worker has none
    (or an empty one), run a one-token dummy batch so that the others' all-to-alls complete."""
    device = next(models[0].parameters()).device
    dummy = torch.full((1, 1), models[0].decoder.dictionary.eos(), dtype=torch.long, device=device)
    batches = iter(batches)
    while True:
        sample = next(batches, None)
        more = torch.tensor([sample is not None], dtype=torch.long, device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        if sample is not None and "net_input" in sample:
            yield sample
        else:
            with torch.no_grad():
                for model in models:
                    model(dummy)


def counting(batches, counts):
    """Yield ``batches``, appending each one's token count to ``counts`` (0 for the empty
    batches that fairseq pads a shard with, and skips)."""
    for sample in batches:
        counts.append(sample.get("ntokens", 0))
        yield sample


def refuse_zero_tokens(count: float) -> None:
    if count == 0:
        raise BaseLayerConfigError(
            "fairseq-eval-lm scored 0 tokens (fairseq skips every block longer than the model's positions); "
            "pass --tokens-per-sample no larger than the one the model was trained with")


def agree_on_evaluated_checkpoints(models) -> None:
    """On W > 1 workers: the files the workers loaded must belong together."""
    loaded = list(checkpoints.LOADED.items())
    checkpoints.agree_across_workers({
        "file": ", ".join(os.path.basename(path) for path, _ in loaded),
        "run_id": [p["run_id"] for _, p in loaded], "num_updates": [p["num_updates"] for _, p in loaded],
        "checksum": [checkpoints.shared_checksum(model) for model in models]})


def eval_lm_on_all_workers(models, source_dictionary, batch_iterator, **kwargs):
    """fairseq's eval_lm over this worker's batches in lockstep, then one global perplexity."""
    if kwargs.get("post_process") is not None:
        raise BaseLayerConfigError("--post-process is not supported by fairseq-eval-lm on several workers; "
                                   "score on one worker (after fairseq-base-reshard --world-size 1)")
    agree_on_evaluated_checkpoints(models)
    counts = []
    local = FAIRSEQ_EVAL_LM(models, source_dictionary, counting(lockstep(batch_iterator, models), counts), **kwargs)
    device = next(models[0].parameters()).device
    count = float(sum(counts))
    totals = torch.tensor([local["loss"] * count, count], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    refuse_zero_tokens(totals[1].item())
    logger.info(f"Evaluated {int(totals[1].item()):,} tokens on all {dist.get_world_size()} workers")
    loss = (totals[0] / totals[1]).item()
    return {"loss": loss, "perplexity": 2 ** loss}


def eval_lm(models, source_dictionary, batch_iterator, **kwargs):
    if not any(has_experts(model) for model in models):
        results = FAIRSEQ_EVAL_LM(models, source_dictionary, batch_iterator, **kwargs)
        if isinstance(results, dict) and results.get("loss") == 0:  # fairseq's loss over no tokens (count 0)
            refuse_zero_tokens(0)
        return results
    if dist.is_initialized() and dist.get_world_size() > 1:
        return eval_lm_on_all_workers(models, source_dictionary, batch_iterator, **kwargs)
    counts = []
    results = FAIRSEQ_EVAL_LM(models, source_dictionary, counting(batch_iterator, counts), **kwargs)
    refuse_zero_tokens(sum(counts))
    return results


def install() -> None:
    fairseq_eval_lm.eval_lm = eval_lm
    fairseq_eval_lm.main = main

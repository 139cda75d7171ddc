"""The adjustments this plugin makes to fairseq, installed when the plugin is imported.

1. ``torchrun`` on a machine without CUDA devices: fairseq's launch inference divides by
   ``torch.cuda.device_count()`` (0) and, with the default --distributed-world-size of 1, never
   looks at torchrun's environment. Here that case takes the world size and rank from the
   environment; every other case is left to fairseq.
2. DDP backends with experts: torch's DDP (``c10d``, ``pytorch_ddp``) leaves the expert
   parameters (and ``expert_ids`` buffers) out of its bucketed all-reduce, and runs on CPU
   modules too (fairseq passes a device id, which torch refuses for a module on the CPU);
   ``legacy_ddp`` skips parameters tagged ``expert`` by itself. Every other backend with
   experts is refused before the first update, with the option to use instead.
3. One checkpoint file per expert-parallel rank (``groups.py``): worker r of a model with
   experts reads ``NAME-rank-{r % P}.pt``, the first P workers write them (their replicas
   hold the same experts), for BASE layers and expert FFNs alike; the saved configuration
   records E and P as numbers (not 0), so that files never depend on the world size.
   Before a save, replicas of each expert must agree bit for bit (``checkpoints.py``).
4. fairseq-eval-lm on W > 1 workers: ``--path NAME.pt`` saved as K files ``NAME-rank-{k}.pt``
   loads ``NAME-rank-{r % K}.pt`` on worker r (fairseq's suffix rule, which eval-lm does not
   apply by itself; K must divide W); workers run in lockstep, a worker out of batches
   joining the others' all-to-alls with a dummy batch; and the perplexity printed is the one
   of all workers' tokens together. Without --tokens-per-sample it scores blocks of the
   checkpoint's length (fairseq's default skips every longer block), and a run that scored
   0 tokens stops with one line instead of printing "Perplexity: 1.00".
5. Gradient norm with experts under every optimizer (fp32, ``--fp16``,
   ``--memory-efficient-fp16``, ``--bf16``, ``--amp``): the norm that clips and that fairseq
   compares across workers covers the shared parameters only, also in fp16's flat fp32 copy
   of all parameters (which loses the ``expert`` tag), and a non-finite expert gradient on
   any worker makes it inf on every worker, so that all skip the step together
   (``grad_norm.py``).
6. ``--bf16`` without TPUs: fairseq's command line turns on ``--tpu`` with ``--bf16``, which
   fails without torch_xla (on CPU in ``distributed_init``) and would take the XLA path on
   GPUs. Where torch_xla is not installed, ``--bf16`` trains on the CPU or GPU instead,
   through fairseq's FP16Optimizer as on a TPU (fp32 master weights, no loss scaling).
7. Checkpoints that belong together (``checkpoints.py``): every checkpoint the trainer
   saves carries the run id and its update; every checkpoint fairseq loads is refused if a
   tensor holds inf or NaN; and when W workers load their own files (training resume,
   ``--restore-file``, fairseq-eval-lm), they compare run id, update and a checksum of the
   shared parameters before the first step and all stop with one line if they differ.
   ``--ddp-backend fully_sharded`` with experts stops with one line (it needs fairscale, and
   would shard experts as if they were shared).
8. numpy 2: fairseq 0.12's TokenBlockDataset uses ``np.compat.long``, which numpy 2 removed,
   so fairseq-interactive and the hub's ``sample`` and ``score`` fail on language models.
   Under numpy 2 the plugin restores that one name (``int``, as numpy 1 defined it).
9. Expert gradients, under every DDP backend and optimizer: after fairseq's all-reduce of the
   shared gradients, each expert's gradient is summed over its W/P replicas and divided by
   W, as DDP divides the shared ones (``ExpertLayout.reduce_expert_grads``).
10. Routing churn: at the start of every validation the trainer marks each expert layer's
    next batch as its probe (``BaseLayer.probe_next_batch``), so that the layers can log the
    share of probe tokens whose expert changed since the last validation.
"""

import glob
import importlib.util
import logging
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from fairseq import checkpoint_utils, models
from fairseq.models import distributed_fairseq_model
from fairseq.optim import FairseqOptimizer
from fairseq.optim.fp16_optimizer import _FP16OptimizerMixin
from fairseq.trainer import Trainer
from fairseq.distributed import utils as distributed_utils
from fairseq_cli import eval_lm as fairseq_eval_lm
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from fairseq_base import checkpoints
from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.groups import resolve_expert_parallel_size, resolve_num_experts
from fairseq_base.layer import BaseLayer, experts_by_layout, reduce_expert_grads
from fairseq_base.grad_norm import clip_grad_norm_with_experts, mark_flat_expert_slices

logger = logging.getLogger(__name__)
TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")
TORCH_DDP_BACKENDS = ("c10d", "pytorch_ddp")  # told to ignore the experts (``ignore_experts_in_torch_ddp``)
EXPERT_SAFE_DDP_BACKENDS = ("legacy_ddp", "no_c10d") + TORCH_DDP_BACKENDS  # legacy_ddp skips params tagged ``expert``


def numpy_compat_long() -> None:
    if not hasattr(np, "compat"):
        np.compat = SimpleNamespace(long=int)


def bf16_without_tpu(cfg) -> None:
    """Undo the --tpu that fairseq's command line sets for --bf16 where there can be no TPU (in
    every config group: the command line copies it into distributed_training too)."""
    if cfg.common.bf16 and cfg.common.tpu and importlib.util.find_spec("torch_xla") is None:
        for name in cfg:
            group = cfg[name]
            if isinstance(group, DictConfig) and group.get("tpu") is True:
                group.tpu = False


def has_expert_options(model_cfg) -> bool:
    return getattr(model_cfg, "base_layers", 0) > 0 or getattr(model_cfg, "base_moe_freq", 0) > 0


def check_sharding(cfg) -> None:
    if cfg.distributed_training.ddp_backend == "fully_sharded" and has_expert_options(cfg.model):
        raise BaseLayerConfigError(
            "--ddp-backend fully_sharded would shard the experts like shared parameters (and needs fairscale); "
            "use --ddp-backend c10d or legacy_ddp")


def has_experts(model) -> bool:
    return any(hasattr(p, "expert") for p in model.parameters())


def agree_on_loaded_checkpoint(trainer, filename: str) -> str:
    """The run id after ``trainer.load_checkpoint(filename)``: the file's, or a new one (rank
    0's). With W > 1 workers that each load their own file, the files must agree."""
    loaded = checkpoints.LOADED.get(os.path.abspath(filename)) if os.path.isfile(filename) else None
    record = {"file": filename if loaded else None, "run_id": loaded["run_id"] if loaded else None,
              "num_updates": loaded["num_updates"] if loaded else 0, "new_run_id": checkpoints.new_run_id()}
    if trainer.data_parallel_world_size == 1:
        return record["run_id"] or record["new_run_id"]
    group, model = trainer.data_parallel_process_group, trainer.get_model()
    if has_experts(model):  # every worker read its own file: they must agree
        record["checksum"] = checkpoints.shared_checksum(model)
        first = checkpoints.agree_across_workers(record, group)[0]
    else:  # rank 0 read the file and sent it to the others
        first = checkpoints.gather(record, group)[0]
    return first["run_id"] or first["new_run_id"]


def agree_on_evaluated_checkpoints(models) -> None:
    """fairseq-eval-lm on W > 1 workers: the files the workers loaded must belong together."""
    loaded = list(checkpoints.LOADED.items())
    checkpoints.agree_across_workers({
        "file": ", ".join(os.path.basename(path) for path, _ in loaded),
        "run_id": [p["run_id"] for _, p in loaded], "num_updates": [p["num_updates"] for _, p in loaded],
        "checksum": [checkpoints.shared_checksum(model) for model in models]})


def infer_cpu_torchrun_init(cfg) -> bool:
    """Fill in ``cfg`` (distributed_training) for torchrun without CUDA; False if that is not the case."""
    if cfg.distributed_init_method is not None or torch.cuda.device_count() > 0:
        return False
    if not all(key in os.environ for key in TORCHRUN_ENV):
        return False
    cfg.distributed_init_method = "env://"
    cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
    cfg.distributed_rank = int(os.environ["RANK"])
    cfg.device_id = int(os.environ["LOCAL_RANK"])
    cfg.distributed_no_spawn = True  # torchrun started the processes
    return True


def check_ddp_backend(args, model) -> None:
    if has_experts(model) and args.ddp_backend not in EXPERT_SAFE_DDP_BACKENDS:
        raise BaseLayerConfigError(
            f"--ddp-backend {args.ddp_backend} would average the experts of different workers; "
            f"use --ddp-backend c10d or legacy_ddp")


def ignore_experts_in_torch_ddp(args, model) -> None:
    """torch's DDP would average the experts of different workers (and overwrite them with rank 0's
    at start); leave them, and the buffers naming them, to ``reduce_expert_grads``."""
    if args.ddp_backend in TORCH_DDP_BACKENDS and has_experts(model):
        names = [name for name, param in model.named_parameters() if hasattr(param, "expert")]
        names += [name for name, _ in model.named_buffers() if name.endswith("expert_ids")]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def torch_ddp(module, device_ids=None, output_device=None, **kwargs):
    """torch's DDP as fairseq builds it, for modules on the CPU too (fairseq always passes a device id)."""
    if next(module.parameters()).device.type == "cpu":
        device_ids = output_device = None
    return DistributedDataParallel(module, device_ids=device_ids, output_device=output_device, **kwargs)


def is_expert_model(model_cfg) -> bool:
    """transformer_lm_base with experts (fairseq's own --base-layers models are left to fairseq)."""
    return has_expert_options(model_cfg) and getattr(model_cfg, "base_expert_parallel_size", None) is not None


def expert_parallel_checkpoints(cfg) -> None:
    """Write E and P into the configuration that checkpoints save and, on W > 1 workers, name
    worker r's checkpoint NAME-rank-{r % P}.pt (which only workers r < P write)."""
    if not is_expert_model(cfg.model):
        return
    workers = cfg.distributed_training.distributed_world_size
    size = resolve_expert_parallel_size(cfg.model.base_expert_parallel_size, workers)
    cfg.model.base_experts = resolve_num_experts(cfg.model.base_experts, size)
    cfg.model.base_expert_parallel_size = size
    if workers > 1:
        cfg.checkpoint.checkpoint_suffix = f"-rank-{cfg.distributed_training.distributed_rank % size}"
        cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True


def rank_suffix_for_eval(cfg, rank: int, workers: int) -> None:
    """Under fairseq-eval-lm on W workers, for --path NAME.pt saved as K files NAME-rank-{0..K-1}.pt,
    load NAME-rank-{r % K}.pt (the file of worker r's expert-parallel rank); K must divide W."""
    paths = cfg.common_eval.path.split(os.pathsep) if cfg.get("common_eval") and cfg.common_eval.path else []
    if not paths or cfg.checkpoint.checkpoint_suffix or any(os.path.exists(p) for p in paths):
        return
    counts = {len(glob.glob(glob.escape(p[: -len(".pt")]) + "-rank-*.pt")) for p in paths}
    files = counts.pop() if len(counts) == 1 else 0
    if files == 0:
        return  # fairseq's own loading reports the missing file
    if workers % files != 0:
        raise BaseLayerConfigError(
            f"--path {paths[0]} is a checkpoint of {files} files (one per expert-parallel rank), which {workers} "
            f"workers cannot share; run on a multiple of {files} workers, or rewrite it with fairseq-base-reshard "
            f"--world-size {workers} --expert-parallel-size Q (Q a divisor of {workers})")
    cfg.checkpoint.checkpoint_suffix = f"-rank-{rank % files}"


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
    """Yield ``batches``, appending each one's token count to ``counts``."""
    for sample in batches:
        counts.append(sample["ntokens"])
        yield sample


def refuse_zero_tokens(count: float) -> None:
    if count == 0:
        raise BaseLayerConfigError(
            "fairseq-eval-lm scored 0 tokens (fairseq skips every block longer than the model's positions); "
            "pass --tokens-per-sample no larger than the one the model was trained with")


def eval_lm_on_all_workers(fairseq_eval, models, source_dictionary, batch_iterator, **kwargs):
    """fairseq's eval_lm over this worker's batches in lockstep, then one global perplexity."""
    if kwargs.get("post_process") is not None:
        raise BaseLayerConfigError("--post-process is not supported by fairseq-eval-lm on several workers; "
                                   "score on one worker (after fairseq-base-reshard --world-size 1)")
    agree_on_evaluated_checkpoints(models)
    counts = []
    local = fairseq_eval(models, source_dictionary, counting(lockstep(batch_iterator, models), counts), **kwargs)
    device = next(models[0].parameters()).device
    count = float(sum(counts))
    totals = torch.tensor([local["loss"] * count, count], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    refuse_zero_tokens(totals[1].item())
    loss = (totals[0] / totals[1]).item()
    return {"loss": loss, "perplexity": 2 ** loss}


def tokens_per_sample_from_checkpoint(cfg, argv) -> None:
    """fairseq-eval-lm: unless --tokens-per-sample is given, score blocks as long as the ones the
    transformer_lm_base checkpoint was trained on (fairseq's default, 1024, skips every block
    longer than the model's positions)."""
    if any(arg.startswith("--tokens-per-sample") for arg in argv) or not cfg.common_eval.path:
        return
    path = cfg.common_eval.path.split(os.pathsep)[0]
    if cfg.checkpoint.checkpoint_suffix:
        path = path[: -len(".pt")] + cfg.checkpoint.checkpoint_suffix + ".pt"
    try:  # only the config is read: mmap leaves the tensors on disk
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)["cfg"]
    except Exception:
        return  # a missing or unreadable file: fairseq's own loading reports it
    if saved["model"].get("_name") == "transformer_lm_base" and "tokens_per_sample" in saved["task"]:
        if cfg.task.tokens_per_sample != saved["task"]["tokens_per_sample"]:
            cfg.task.tokens_per_sample = saved["task"]["tokens_per_sample"]
            logger.info(f"fairseq_base: --tokens-per-sample {cfg.task.tokens_per_sample}, as the checkpoint was "
                        f"trained (pass --tokens-per-sample to choose)")


def install() -> None:
    if getattr(distributed_utils.infer_init_method, "fairseq_base", False):
        return
    fairseq_infer_init_method = distributed_utils.infer_init_method
    fairseq_distributed_init = distributed_utils.distributed_init
    fairseq_wrap_model = models.DistributedFairseqModel
    fairseq_eval = fairseq_eval_lm.eval_lm
    fairseq_eval_main = fairseq_eval_lm.main
    fairseq_trainer_init = Trainer.__init__
    fairseq_should_save = Trainer.should_save_checkpoint_on_current_rank
    fairseq_call_main = distributed_utils.call_main
    fairseq_build_fp32_params = _FP16OptimizerMixin.build_fp32_params.__func__
    fairseq_load_checkpoint_to_cpu = checkpoint_utils.load_checkpoint_to_cpu
    fairseq_trainer_load_checkpoint = Trainer.load_checkpoint
    fairseq_trainer_state_dict = Trainer.state_dict
    fairseq_all_reduce_grads = FairseqOptimizer.all_reduce_grads
    fairseq_save_checkpoint = checkpoint_utils.save_checkpoint
    fairseq_begin_valid_epoch = Trainer.begin_valid_epoch

    def infer_init_method(cfg, force_distributed=False):
        if not infer_cpu_torchrun_init(cfg):
            fairseq_infer_init_method(cfg, force_distributed)

    def distributed_init(cfg):
        rank = fairseq_distributed_init(cfg)
        rank_suffix_for_eval(cfg, rank, cfg.distributed_training.distributed_world_size)
        return rank

    def wrap_model(args, model, process_group, device):
        check_ddp_backend(args, model)
        ignore_experts_in_torch_ddp(args, model)
        return fairseq_wrap_model(args, model, process_group, device)

    def eval_lm(models, source_dictionary, batch_iterator, **kwargs):
        if dist.is_initialized() and dist.get_world_size() > 1:
            return eval_lm_on_all_workers(fairseq_eval, models, source_dictionary, batch_iterator, **kwargs)
        counts = []
        results = fairseq_eval(models, source_dictionary, counting(batch_iterator, counts), **kwargs)
        refuse_zero_tokens(sum(counts))
        return results

    def eval_lm_main(cfg, **kwargs):
        tokens_per_sample_from_checkpoint(cfg, sys.argv)
        return fairseq_eval_main(cfg, **kwargs)

    # The trainer, not distributed_init: fairseq's spawn path runs that before the plugin is imported.
    def trainer_init(self, cfg, *args, **kwargs):
        expert_parallel_checkpoints(cfg)
        fairseq_trainer_init(self, cfg, *args, **kwargs)

    def should_save_checkpoint_on_current_rank(self) -> bool:
        if is_expert_model(self.cfg.model) and self.data_parallel_world_size > 1:
            return self.data_parallel_rank < self.cfg.model.base_expert_parallel_size
        return fairseq_should_save.fget(self)

    def call_main(cfg, main, **kwargs):
        bf16_without_tpu(cfg)
        check_sharding(cfg)
        return fairseq_call_main(cfg, main, **kwargs)

    def load_checkpoint_to_cpu(path, *args, **kwargs):
        state = fairseq_load_checkpoint_to_cpu(path, *args, **kwargs)
        checkpoints.check_finite(state, path)
        checkpoints.remember(path, state)
        return state

    def save_checkpoint(cfg, trainer, *args, **kwargs):  # on every worker
        for layout, params in experts_by_layout(trainer.get_model()):
            checkpoints.check_replicas_agree(layout, params)
        return fairseq_save_checkpoint(cfg, trainer, *args, **kwargs)

    def begin_valid_epoch(self, epoch):
        for layer in self.get_model().modules():
            if isinstance(layer, BaseLayer):
                layer.probe_next_batch = True
        return fairseq_begin_valid_epoch(self, epoch)

    def trainer_load_checkpoint(self, filename, *args, **kwargs):
        extra_state = fairseq_trainer_load_checkpoint(self, filename, *args, **kwargs)
        self.fairseq_base_run_id = agree_on_loaded_checkpoint(self, filename)
        return extra_state

    def trainer_state_dict(self):
        state = fairseq_trainer_state_dict(self)
        checkpoints.stamp(state, getattr(self, "fairseq_base_run_id", None), self.get_num_updates())
        return state

    def build_fp32_params(cls, args, params, flatten=True):
        fp32_params = fairseq_build_fp32_params(cls, args, params, flatten)
        if flatten:
            mark_flat_expert_slices(fp32_params, params)
        return fp32_params

    def clip_grad_norm(self, max_norm, aggregate_norm_fn=None):
        return clip_grad_norm_with_experts(self.params, max_norm, aggregate_norm_fn)

    def all_reduce_grads(self, module):
        fairseq_all_reduce_grads(self, module)
        reduce_expert_grads(module)

    numpy_compat_long()
    infer_init_method.fairseq_base = True
    distributed_utils.infer_init_method = infer_init_method
    distributed_utils.distributed_init = distributed_init
    models.DistributedFairseqModel = wrap_model
    fairseq_eval_lm.eval_lm = eval_lm
    fairseq_eval_lm.main = eval_lm_main
    Trainer.__init__ = trainer_init
    Trainer.should_save_checkpoint_on_current_rank = property(should_save_checkpoint_on_current_rank)
    distributed_utils.call_main = call_main
    _FP16OptimizerMixin.build_fp32_params = classmethod(build_fp32_params)
    FairseqOptimizer.clip_grad_norm = clip_grad_norm
    FairseqOptimizer.all_reduce_grads = all_reduce_grads
    distributed_fairseq_model.DistributedDataParallel = torch_ddp
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    checkpoint_utils.save_checkpoint = save_checkpoint
    Trainer.begin_valid_epoch = begin_valid_epoch
    Trainer.load_checkpoint = trainer_load_checkpoint
    Trainer.state_dict = trainer_state_dict

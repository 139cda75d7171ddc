"""Mixed precision with experts, through fairseq's own optimizers built on CPU tensors:
the gradient norm covers shared parameters only, and an overflow in any expert gradient
on any worker makes every worker skip the step."""

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.optim.fp16_optimizer import FP16Optimizer, MemoryEfficientFP16Optimizer
from fairseq.trainer import Trainer
from torch import nn

import fairseq_base  # noqa: F401  (installs the patches)
from distributed_utils import run_workers
from fairseq_base.layer import BaseLayer

OPTIMIZERS = {"fp16": FP16Optimizer, "memory_efficient_fp16": MemoryEfficientFP16Optimizer,
              "bf16": FP16Optimizer}


def fairseq_cfg(precision, world_size=1):
    parser = options.get_training_parser()
    flags = ["--optimizer", "adam", "--lr", "0.01", "--fp16-init-scale", "128",
             "--distributed-world-size", str(world_size)]
    flags += {"fp16": ["--fp16"], "memory_efficient_fp16": ["--memory-efficient-fp16"], "bf16": ["--bf16"],
              "amp": ["--amp"]}[precision]
    args = options.parse_args_and_arch(parser, ["unused", "--task", "language_modeling", "--arch", "transformer_lm"] + flags)
    return convert_namespace_to_omegaconf(args)


class TinyModel(nn.Module):
    """A shared projection and a BASE layer: the two kinds of parameters."""

    def __init__(self, num_experts=2):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.base = BaseLayer(4, 8, num_experts)


def build(precision, world_size=1, monkeypatch=None):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    model = TinyModel(num_experts=2).to(dtype)
    params = list(model.parameters())
    # fairseq puts the flat fp32 copy on torch.cuda.current_device(); a CPU tensor's device index is None.
    patch = monkeypatch.setattr if monkeypatch else lambda *a: setattr(*a)
    patch(torch.cuda, "current_device", lambda: None)
    optimizer = OPTIMIZERS[precision].build_optimizer(fairseq_cfg(precision, world_size), params)
    return model, optimizer


def set_grads(model, optimizer, shared, expert, scale=1.0):
    """Every shared gradient entry = shared, every expert one = expert (times the loss scale
    ``scale``, as backward would leave them), as fairseq's backward would hand them over."""
    for p in model.parameters():
        value = expert if getattr(p, "expert", False) else shared
        p.grad = torch.full_like(p, value * scale)
    optimizer._needs_sync = True


def count(model, expert):
    return sum(p.numel() for p in model.parameters() if getattr(p, "expert", False) == expert)


@pytest.mark.parametrize("precision", list(OPTIMIZERS))
def test_norm_covers_shared_parameters_and_clips_experts_by_the_same_factor(precision, monkeypatch):
    model, optimizer = build(precision, monkeypatch=monkeypatch)
    scale = optimizer.scaler.loss_scale if optimizer.scaler else 1.0
    optimizer.zero_grad()  # sets the multiply factor to 1 / loss scale, as in training
    set_grads(model, optimizer, shared=0.5, expert=3.0, scale=scale)
    shared_norm = 0.5 * count(model, expert=False) ** 0.5
    full_norm = (0.25 * count(model, False) + 9.0 * count(model, True)) ** 0.5
    norm = optimizer.clip_grad_norm(1.0)
    assert norm.item() == pytest.approx(shared_norm, rel=1e-3)
    assert full_norm > 2 * shared_norm  # what the flat copy's norm was before
    optimizer._unscale_grads()
    coef = 1.0 / shared_norm
    grads = optimizer.fp32_params if precision != "memory_efficient_fp16" else list(model.parameters())
    if precision == "fp16":  # one flat fp32 copy: the expert parts are its marked slices
        flat = next(iter(grads.values()))
        expert_mask = torch.zeros(flat.numel(), dtype=torch.bool)
        for begin, end in flat.expert_slices:
            expert_mask[begin:end] = True
        assert int(expert_mask.sum()) == count(model, expert=True)
        expected = torch.where(expert_mask, 3.0 * coef, 0.5 * coef)
        assert torch.allclose(flat.grad, expected, rtol=1e-3)
    else:
        for p in grads:
            want = (3.0 if getattr(p, "expert", False) else 0.5) * coef
            assert torch.allclose(p.grad.float(), torch.full_like(p.grad.float(), want), rtol=1e-2)


def _consistency_worker(rank, world_size):
    """For every precision: the norm each worker computes, and whether fairseq's norm over
    every gradient would have failed the trainer's cross-worker check."""
    results = {}
    for precision in OPTIMIZERS:
        model, optimizer = build(precision, world_size)
        scale = optimizer.scaler.loss_scale if optimizer.scaler else 1.0
        optimizer.zero_grad()
        # Shared gradients agree after the all-reduce; each worker's expert gradients are its own.
        set_grads(model, optimizer, shared=0.5, expert=1.0 + rank, scale=scale)
        norm = optimizer.clip_grad_norm(1.0)
        trainer = SimpleNamespace(_grad_norm_buf=torch.zeros(world_size, dtype=torch.double),
                                  data_parallel_rank=rank, data_parallel_process_group=None,
                                  cfg=SimpleNamespace(common=SimpleNamespace(amp=False)))
        Trainer._check_grad_norms(trainer, norm)  # raises FloatingPointError if the norms differ
        every_grad = torch.cat([p.grad.float().flatten() for p in model.parameters()]).norm() / scale
        try:
            Trainer._check_grad_norms(trainer, every_grad)
            inconsistent = False
        except FloatingPointError:
            inconsistent = True
        results[precision] = (norm.item(), inconsistent)
    return results


def test_trainers_consistency_check_passes_with_different_expert_gradients():
    workers = run_workers(_consistency_worker, 2)
    for precision in OPTIMIZERS:
        (norm0, inconsistent0), (norm1, inconsistent1) = workers[0][precision], workers[1][precision]
        assert norm0 == norm1, precision
        assert inconsistent0 and inconsistent1  # the check would catch a norm that included experts


def _step(rank, world_size, precision, poisoned_rank, where):
    """One training step as fairseq's trainer takes it: clip (which raises OverflowError on
    overflow), then step; on overflow, zero the gradients and skip."""
    model, optimizer = build(precision, world_size)
    optimizer.zero_grad()
    set_grads(model, optimizer, shared=0.5, expert=1.0, scale=optimizer.scaler.loss_scale)
    if rank == poisoned_rank:
        target = next(p for p in model.parameters() if getattr(p, "expert", False) == (where == "expert"))
        target.grad.view(-1)[0] = float("inf")
    for p in model.parameters():  # legacy_ddp's all-reduce of the shared gradients
        if not getattr(p, "expert", False):
            torch.distributed.all_reduce(p.grad)
            p.grad /= world_size
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        optimizer.clip_grad_norm(1.0)
        optimizer.step()
        stepped = True
    except OverflowError:
        optimizer.zero_grad()
        stepped = False
    unchanged = {n: torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()}
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return stepped, optimizer.scaler.loss_scale, unchanged, finite


def _overflow_worker(rank, world_size, precision):
    """An inf in worker 1's expert gradient, then in its shared gradient, then none."""
    return [_step(rank, world_size, precision, poisoned_rank, where)
            for poisoned_rank, where in ((1, "expert"), (1, "shared"), (-1, "none"))]


@pytest.mark.parametrize("precision", ["fp16", pytest.param("memory_efficient_fp16", marks=pytest.mark.slow)])
def test_overflow_on_one_worker_makes_every_worker_skip_the_step(precision):
    expert_inf, shared_inf, no_inf = zip(*run_workers(_overflow_worker, 2, precision))
    for stepped, loss_scale, unchanged, finite in expert_inf + shared_inf:
        assert not stepped
        assert loss_scale == 64.0  # lowered from 128, on both workers
        assert all(unchanged.values())  # nothing written into the experts (or anything else)
        assert finite
    for stepped, loss_scale, unchanged, finite in no_inf:  # without an overflow both workers step
        assert stepped and loss_scale == 128.0 and finite
        assert not any(unchanged[n] for n in unchanged if "experts" in n and "ff1" in n)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", list(OPTIMIZERS))
def test_on_cuda_the_norm_covers_shared_parameters(precision):
    """The same as on CPU, with fairseq's flat fp32 copy on the real CUDA device."""
    torch.manual_seed(0)
    model = TinyModel().cuda().to(torch.bfloat16 if precision == "bf16" else torch.float16)
    optimizer = OPTIMIZERS[precision].build_optimizer(fairseq_cfg(precision), list(model.parameters()))
    optimizer.zero_grad()
    set_grads(model, optimizer, shared=0.5, expert=3.0, scale=optimizer.scaler.loss_scale if optimizer.scaler else 1)
    assert optimizer.clip_grad_norm(1.0).item() == pytest.approx(0.5 * count(model, expert=False) ** 0.5, rel=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_base_layer_on_cuda_matches_cpu_float32(dtype):
    torch.manual_seed(0)
    layer = BaseLayer(64, 128, num_experts=4).train()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    # The fp32 reference sees the same rounded inputs and weights as the GPU layer: otherwise
    # rounding alone moves tokens whose top experts nearly tie (2 of 512 here).
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(p.to(dtype).float())
    x = torch.randn(512, 1, 64).to(dtype).float()
    reference = layer(x)[0]
    out = layer.cuda().to(dtype)(x.cuda().to(dtype))[0]
    assert out.dtype == dtype
    assert torch.allclose(out.float().cpu(), reference, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("with_experts", [False, True])
def test_fp32_optimizer_clips_models_with_and_without_experts(with_experts):
    """fairseq's optimizers pass their parameters as a generator; every gradient must still be
    seen and clipped (a dense model once got norm 0 and no clipping at all)."""
    from fairseq import optim
    torch.manual_seed(0)
    model = TinyModel() if with_experts else nn.Linear(4, 4)
    optimizer = optim.build_optimizer(fairseq_cfg("fp16").optimizer, list(model.parameters()))
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0 if getattr(p, "expert", False) else 0.5)
    shared = [p for p in model.parameters() if not getattr(p, "expert", False)]
    expected = 0.5 * sum(p.numel() for p in shared) ** 0.5
    norm = optimizer.clip_grad_norm(1.0)
    assert norm.item() == pytest.approx(expected, rel=1e-5)
    for p in model.parameters():
        value = 3.0 if getattr(p, "expert", False) else 0.5
        assert torch.allclose(p.grad, torch.full_like(p, value / expected), rtol=1e-4)


def test_amp_with_experts_on_several_workers_is_refused_as_each_worker_builds_its_optimizer():
    """Also where nothing of the plugin ran before launch (fairseq-hydra-train imports it in each
    worker's train.main): fairseq's AMPOptimizer, as its trainer builds it, refuses."""
    from fairseq.optim.amp_optimizer import AMPOptimizer
    from fairseq_base.errors import BaseLayerConfigError

    with pytest.raises(BaseLayerConfigError, match="--amp with experts on several workers"):
        AMPOptimizer.build_optimizer(fairseq_cfg("amp", 2), list(TinyModel().parameters()))
    for world_size, model in ((1, TinyModel()), (2, nn.Linear(4, 4))):  # one worker, or no experts: fairseq's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's GradScaler, disabled without CUDA, says so
            built = AMPOptimizer.build_optimizer(fairseq_cfg("amp", world_size), list(model.parameters()))
        assert isinstance(built, AMPOptimizer)

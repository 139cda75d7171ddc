import os

import pytest
import torch
from torch import nn
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from hydra import compose, initialize_config_dir

from fairseq_base.errors import BaseLayerConfigError
from fairseq_base.layer import BaseLayer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(REPO, "fairseq_base")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dict")
    (path / "dict.txt").write_text("".join(f"w{i} {100 - i}\n" for i in range(20)))
    return str(path)


def build_from_cli(data_dir, *flags):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        data_dir, "--user-dir", PLUGIN, "--task", "language_modeling", "--arch", "transformer_lm_base",
        "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
        "--tokens-per-sample", "16", *flags])
    cfg = convert_namespace_to_omegaconf(args)
    return tasks.setup_task(cfg.task).build_model(cfg.model)


def layer_kinds(model):
    return ["B" if isinstance(layer, BaseLayer) else "T" for layer in model.decoder.layers]


def test_cli_defaults_follow_the_paper(data_dir):
    model = build_from_cli(data_dir, "--decoder-layers", "4")
    assert layer_kinds(model) == list("TTBTT")
    base = model.decoder.layers[2]
    assert base.num_experts == 1  # --base-experts 0: one expert per worker, one worker here
    assert not base.shuffle and base.eval_routing == "greedy"
    assert model.decoder.num_layers == 5
    assert model.decoder.layers[0].normalize_before  # pre-LayerNorm, as transformer_lm and the paper
    # input and output dimensions follow --decoder-embed-dim, as with --arch transformer_lm
    assert model.decoder.project_in_dim is None and model.decoder.project_out_dim is None
    assert model.decoder.embed_tokens.embedding_dim == 16


def test_cli_options(data_dir):
    model = build_from_cli(data_dir, "--decoder-layers", "24", "--base-layers", "3", "--base-experts", "4",
                           "--base-sublayers", "2", "--base-eval-routing", "balanced", "--base-shuffle", "0")
    kinds = layer_kinds(model)
    assert [i - n for n, i in enumerate(i for i, k in enumerate(kinds) if k == "B")] == [6, 12, 18]
    base = [layer for layer in model.decoder.layers if isinstance(layer, BaseLayer)]
    assert [b.name for b in base] == ["base1", "base2", "base3"]
    assert all(b.experts.num_experts == 4 and len(b.experts.sublayers) == 2 and b.eval_routing == "balanced" for b in base)
    top = build_from_cli(data_dir, "--decoder-layers", "3", "--base-positions", "L")
    assert layer_kinds(top) == list("TTTB")


def test_no_fairseq_base_layer_inside(data_dir):
    from fairseq.modules.base_layer import BaseLayer as FairseqBaseLayer
    model = build_from_cli(data_dir, "--decoder-layers", "2", "--base-layers", "2")
    assert not any(isinstance(m, FairseqBaseLayer) for m in model.modules())


def test_dense_options_keep_working(data_dir):
    model = build_from_cli(data_dir, "--decoder-layers", "2", "--base-layers", "0",
                           "--share-decoder-input-output-embed", "--activation-fn", "gelu")
    assert layer_kinds(model) == list("TT")
    assert model.decoder.output_projection.weight is model.decoder.embed_tokens.weight


@pytest.mark.parametrize("flags,match", [
    (["--base-positions", "9"], "--base-positions"),
    (["--base-layers", "2", "--base-positions", "1"], "--base-layers is 2"),
    (["--base-experts", "-1"], "--base-experts must be >= 0"),
    (["--base-sublayers", "0"], "--base-sublayers must be >= 1"),
    (["--decoder-layerdrop", "0.1"], "--decoder-layerdrop"),
    (["--base-shuffle", "2"], "--base-shuffle must be 0 or 1, got 2"),
    (["--base-expert-parallel-size", "-1"], "--base-expert-parallel-size must be >= 0"),
    (["--base-expert-parallel-size", "2"], "--base-expert-parallel-size 2 does not divide the 1 worker"),
    (["--decoder-layers", "2", "--base-layers", "50"], "--base-layers 50 is more than the 3 places around 2 decoder"),
    (["--base-router", "switch", "--base-capacity-factor", "-1"], "--base-capacity-factor must be >= 0, got -1.0"),
    (["--base-balance-loss", "-0.5"], "--base-balance-loss must be >= 0, got -0.5"),
    (["--base-experts", "100000000"],
     r"--base-experts 100000000: this worker.s 100000000 experts would take [0-9.]+ GiB"),
])
def test_bad_options_are_refused(data_dir, flags, match):
    with pytest.raises(BaseLayerConfigError, match=match):
        build_from_cli(data_dir, "--decoder-layers", "4", *flags)


def test_checkpoint_with_other_expert_count_is_refused(data_dir):
    saved = build_from_cli(data_dir, "--decoder-layers", "2", "--base-experts", "4").state_dict()
    model = build_from_cli(data_dir, "--decoder-layers", "2", "--base-experts", "2")
    with pytest.raises(BaseLayerConfigError, match="checkpoint has 4 experts.*--base-experts 4"):
        model.load_state_dict(saved)
    same = build_from_cli(data_dir, "--decoder-layers", "2", "--base-experts", "4")
    same.load_state_dict(saved)
    assert torch.equal(same.decoder.layers[1].centroids, saved["decoder.layers.1.centroids"])


def test_build_from_hydra_config(data_dir):
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.1"):
        cfg = compose("small_base", overrides=[
            f"task.data={data_dir}", f"common.user_dir={PLUGIN}",
            "model.base_experts=8", "model.base_positions='0,2'", "model.base_layers=2"])
    from fairseq import utils
    from fairseq.dataclass.initialize import add_defaults
    utils.import_user_module(cfg.common)
    add_defaults(cfg)  # as fairseq-hydra-train does
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    assert layer_kinds(model) == list("BTTBTT")
    assert model.decoder.project_in_dim is None and model.decoder.embed_tokens.embedding_dim == 128
    assert all(b.experts.num_experts == 8 for b in model.decoder.layers if isinstance(b, BaseLayer))


def test_gradient_clipping_takes_the_norm_over_shared_parameters_and_rescales_all():
    # The paper clips by the norm of the shared parameters; fairseq's clip_grad_norm_ leaves
    # params tagged `expert` out of the norm and rescales them with the same coefficient.
    from fairseq import utils
    layer = BaseLayer(4, 8, num_experts=2)
    params = list(layer.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    shared_norm = torch.cat([p.grad.flatten() for p in params if not getattr(p, "expert", False)]).norm()
    total_norm = utils.clip_grad_norm_(params, max_norm=0.1)
    assert torch.allclose(total_norm, shared_norm)
    coef = 0.1 / (shared_norm + 1e-6)
    for p in params:
        assert torch.allclose(p.grad, torch.full_like(p, coef.item())), p.shape


def test_expert_gradients_are_divided_by_the_worker_count():
    """With P = W there are no replicas: reduce_expert_grads divides expert gradients by W only."""
    from fairseq_base.groups import ExpertLayout
    from fairseq_base.layer import reduce_expert_grads
    x = torch.randn(6, 1, 4)
    layers = [BaseLayer(4, 8, num_experts=2).train() for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    for layer in layers:
        layer(x)[0].pow(2).sum().backward()
    layers[1].layout = ExpertLayout(world_size=4, expert_parallel_size=4)
    reduce_expert_grads(nn.Sequential(*layers))
    plain, divided = (dict(layer.named_parameters()) for layer in layers)
    for name, p in plain.items():
        scale = 4.0 if getattr(p, "expert", False) else 1.0
        assert torch.allclose(p.grad, divided[name].grad * scale), name

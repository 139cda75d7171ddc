"""Every Hydra config composes and builds; each small_* config trains a few updates."""

import dataclasses
import os
import re

import pytest
import torch
from fairseq import tasks, utils
from fairseq.dataclass.initialize import add_defaults
from hydra import compose, initialize_config_dir

from fairseq_base.layer import BaseLayer
from fairseq_base.models.transformer_lm_base import ExpertFeedForwardLayer
from fairseq_runs import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
PAPER = {"paper_base": (24, [12], 10), "paper_base_x3": (24, [6, 12, 18], 3),
         "paper_base_top": (24, [24], 10), "paper_dense": (24, [], None),
         "paper_switch": (24, [], None), "paper_moe_top2": (24, [], None)}
SMALL = {"small_base": (4, [2], 3), "small_base_x3": (4, [1, 2, 3], 1), "small_base_top": (4, [4], 3),
         "small_dense": (4, [], None), "small_switch": (4, [], None), "small_moe_top2": (4, [], None),
         "small_hash": (4, [], None), "small_routers": (4, [], None)}
# The MoE baselines: every other FFN (layers 2, 4, ... counting from 1) is an expert FFN.
ROUTER = {"paper_switch": ("switch", 1.0), "paper_moe_top2": ("top2", 2.0), "small_switch": ("switch", 1.0),
          "small_moe_top2": ("top2", 2.0), "small_hash": ("hash", None), "small_routers": ("balanced", None)}


def compose_config(name, data_dir, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.1"):
        cfg = compose(name, overrides=[f"task.data={data_dir}", f"common.user_dir={REPO}/fairseq_base",
                                       f"checkpoint.save_dir={data_dir}/ckpt", *overrides])
    utils.import_user_module(cfg.common)
    add_defaults(cfg)
    return cfg


def base_positions(model):
    positions, trunk = [], 0
    for layer in model.decoder.layers:
        if isinstance(layer, BaseLayer):
            positions.append(trunk)
        else:
            trunk += 1
    return trunk, positions


def expert_ffn_layers(model):
    trunk = [layer for layer in model.decoder.layers if not isinstance(layer, BaseLayer)]
    return [i + 1 for i, layer in enumerate(trunk) if isinstance(layer, ExpertFeedForwardLayer)]


@pytest.mark.parametrize("name", sorted({**PAPER, **SMALL}))
def test_config_composes_and_builds(data_bin, name):
    layers, positions, sublayers = {**PAPER, **SMALL}[name]
    tiny = ["model.decoder_embed_dim=16", "model.decoder_ffn_embed_dim=32", "model.decoder_attention_heads=2",
            "model.base_experts=2"]  # in one process, not one expert per GPU
    cfg = compose_config(name, data_bin / "bin", *(tiny if name in PAPER else []))
    assert cfg.model.decoder_layers == layers
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    assert base_positions(model) == (layers, positions)
    if sublayers:
        assert all(len(layer.experts.sublayers) == sublayers for layer in model.decoder.layers
                   if isinstance(layer, BaseLayer))
    moe = expert_ffn_layers(model)
    if name in ROUTER:
        assert moe == list(range(2, layers + 1, 2))
        assert {(layer.moe.router, layer.moe.capacity_factor) for layer in model.decoder.layers
                if isinstance(layer, ExpertFeedForwardLayer)} == {ROUTER[name]}
        assert cfg.criterion._name == "base_cross_entropy"
    else:
        assert moe == []


def test_one_override_changes_experts_and_placement(data_bin):
    cfg = compose_config("small_base", data_bin / "bin", "model.base_experts=8", "model.base_positions=L")
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    assert base_positions(model) == (4, [4])
    assert [layer.experts.num_experts for layer in model.decoder.layers if isinstance(layer, BaseLayer)] == [8]


# Each small config trains (in the slow tier; test_config_composes_and_builds builds every config).
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_config_trains(data_bin, tmp_path, name):
    result = run("fairseq-hydra-train", "--config-dir", CONFIGS, "--config-name", name,
                 f"task.data={data_bin / 'bin'}", "optimization.max_update=4", "common.log_interval=2",
                 f"checkpoint.save_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra")
    log = result.stdout + result.stderr
    assert re.search(r"num_updates 4\b", log), log[-2000:]
    assert (tmp_path / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_train_in_bf16(name):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.1"):
        cfg = compose(name, overrides=["task.data=unused"])
    assert cfg.common.bf16 and not cfg.common.get("fp16", False) and not cfg.common.get("tpu", False)


@pytest.mark.slow
def test_paper_config_trains_in_bf16_on_cpu(data_bin, tmp_path):
    result = run("fairseq-hydra-train", "--config-dir", CONFIGS, "--config-name", "paper_base",
                 f"task.data={data_bin / 'bin'}", "common.cpu=true", "model.base_experts=2",
                 "model.decoder_layers=2", "model.base_positions=1", "model.decoder_embed_dim=16",
                 "model.decoder_ffn_embed_dim=32", "model.decoder_attention_heads=2", "model.base_sublayers=2",
                 "task.tokens_per_sample=64", "optimization.update_freq=[1]", "optimization.max_update=3",
                 "common.log_interval=1", "dataset.num_workers=0",
                 f"checkpoint.save_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra")
    log = result.stdout + result.stderr
    assert re.search(r"num_updates 3\b", log), log[-2000:]
    saved = torch.load(tmp_path / "checkpoint_last.pt", weights_only=False)
    assert saved["cfg"]["common"]["bf16"] and "loss_scale" not in saved["last_optimizer_state"]


@pytest.mark.parametrize("name", sorted({**PAPER, **SMALL}))
def test_every_config_holds_every_plugin_key(name):
    """So that one plain override, model.KEY=VALUE, sets any option (Hydra refuses new keys)."""
    from fairseq_base.models.transformer_lm_base import TransformerLanguageModelBaseConfig
    plugin_keys = {f.name for f in dataclasses.fields(TransformerLanguageModelBaseConfig) if f.name.startswith("base_")}
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.1"):
        cfg = compose(name, overrides=["task.data=unused", "model.base_router=sbase", "model.base_moe_freq=3"])
    assert plugin_keys <= set(cfg.model), sorted(plugin_keys - set(cfg.model))
    assert cfg.model.base_router == "sbase" and cfg.model.base_moe_freq == 3


@pytest.mark.slow
def test_a_hydra_run_without_data_is_one_line(tmp_path):
    result = run("fairseq-hydra-train", "--config-dir", CONFIGS, "--config-name", "small_base",
                 f"checkpoint.save_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert ("no data directory: pass it as task.data=DIR to fairseq-hydra-train (as the first argument to "
            "fairseq-train)") in result.stdout + result.stderr


def test_a_seed_starts_every_model_of_a_comparison_from_the_same_trunk(data_bin):
    """scripts/reproduce_small.py pairs its models seed by seed: with one seed (fairseq-train seeds
    torch before it builds the model, and the data order from the seed alone), every model of
    each comparison starts from the same embeddings and attention blocks, whatever its expert
    layers draw after them."""
    import sys
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from reproduce.comparisons import COMPARISONS

    def trunk(config, overrides):
        cfg = compose_config(config, data_bin / "bin", "common.seed=7", *overrides)
        utils.set_torch_seed(cfg.common.seed)  # as fairseq_cli/train.py before it builds the model
        model = tasks.setup_task(cfg.task).build_model(cfg.model)
        blocks = [getattr(layer, "attention", layer) for layer in model.decoder.layers if not isinstance(layer, BaseLayer)]
        return [model.decoder.embed_tokens.weight] + [param for block in blocks for name, param in
                                                      block.named_parameters() if name.startswith("self_attn")]

    for comparison, models in COMPARISONS.items():
        assert not [name for name in models if "," in name]  # --models takes a comma-separated list
        first, *others = [trunk(config, overrides) for config, overrides in models.values()]
        assert len(first) == 1 + 4 * 10  # embeddings; per layer q, k, v, out (weight, bias) and the LayerNorm
        for other in others:
            assert all(torch.equal(a, b) for a, b in zip(first, other)), comparison

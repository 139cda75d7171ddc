"""fairseq-base-upcycle and --finetune-from-model DENSE.pt: a dense transformer_lm as the start of a
transformer_lm_base model that computes what the dense one did."""

import functools
import os
import re

import pytest
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq_base.layer import BaseLayer
from fairseq_base.router import ROUTER_RECORDS
from fairseq_base.dense_to_experts import Origin, UpcycleError, upcycle_optimizer_entries, upcycle_state
from fairseq_base.upcycle import dense_config
from fairseq_runs import BIN, DENSE, REPO, TINY_MODEL, eval_command, eval_result_loss, losses, run

PLUGIN = os.path.join(REPO, "fairseq_base")
TRUNK = ["--decoder-embed-dim", "16", "--decoder-input-dim", "16", "--decoder-output-dim", "16",
         "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2", "--decoder-layers", "3",
         "--decoder-normalize-before", "--tokens-per-sample", "16"]
KINDS = {"a BASE layer": ["--base-layers", "1"], "expert FFNs": ["--base-layers", "0", "--base-moe-freq", "2"],
         "both": ["--base-layers", "2", "--base-moe-freq", "1"]}


@pytest.fixture(scope="module")
def dictionary(tmp_path_factory):
    path = tmp_path_factory.mktemp("dict")
    (path / "dict.txt").write_text("".join(f"w{i} {100 - i}\n" for i in range(20)))
    return str(path)


@functools.lru_cache(maxsize=None)
def task_and_model_config(dictionary, arch, *flags):
    """Parsed once per command line: fairseq's parser takes about a second to build."""
    args = options.parse_args_and_arch(options.get_training_parser(), [
        dictionary, "--user-dir", PLUGIN, "--task", "language_modeling", "--arch", arch, *TRUNK, *flags])
    cfg = convert_namespace_to_omegaconf(args)
    return tasks.setup_task(cfg.task), cfg.model


def build(dictionary, arch, *flags):
    task, model_cfg = task_and_model_config(dictionary, arch, *flags)
    return task.build_model(model_cfg).eval()


def log_probs(model, tokens):
    with torch.no_grad():
        return model.get_normalized_probs(model(tokens), log_probs=True)


@pytest.fixture(scope="module")
def dense(dictionary):
    torch.manual_seed(0)
    return build(dictionary, "transformer_lm")


# "both" in the default tier; BASE layers alone and expert FFNs alone in the slow one.
@pytest.mark.parametrize("kind", [pytest.param(kind, marks=[] if kind == "both" else [pytest.mark.slow])
                                  for kind in KINDS])
@pytest.mark.parametrize("router", [record.name for record in ROUTER_RECORDS])
def test_a_dense_model_loaded_into_expert_layers_computes_as_before(dictionary, dense, router, kind):
    """A dense transformer_lm's state dict loaded into transformer_lm_base (what --finetune-from-model
    does): the trunk under its new indices, inserted BASE layers the identity, expert FFN slots
    copies of the dense FFN with the gates arranged to add it once. Same log-probabilities."""
    tokens = torch.randint(4, 20, (3, 12), generator=torch.Generator().manual_seed(0))
    flags = [*KINDS[kind], "--base-router", router, "--base-experts", "3" if router == "switch" else "4"]
    if router in ("switch", "top2"):
        flags += ["--criterion", "base_cross_entropy"]
    upcycled = build(dictionary, "transformer_lm_base", *flags)
    upcycled.load_state_dict(dense.state_dict())
    expected = log_probs(dense, tokens)
    assert any(isinstance(m, BaseLayer) for m in upcycled.modules())
    assert torch.allclose(log_probs(upcycled, tokens), expected, atol=1e-5, rtol=0)
    fresh = build(dictionary, "transformer_lm_base", *flags)  # not upcycled: the experts change the output
    fresh.load_state_dict(upcycled.state_dict())
    for module in fresh.modules():
        if isinstance(module, BaseLayer):
            for param in module.experts.parameters():
                torch.nn.init.normal_(param)
    assert not torch.allclose(log_probs(fresh, tokens), expected, atol=1e-3)


def test_a_trunk_that_does_not_fit_the_options_is_one_line(dictionary, dense):
    dense = dense.state_dict()
    wider = build(dictionary, "transformer_lm_base", "--decoder-ffn-embed-dim", "48")
    with pytest.raises(UpcycleError, match=r"decoder.layers.0.fc1.weight of the dense model has shape \(32, 16\) but "
                                           r"the options give decoder.layers.0.fc1.weight \(48, 16\): pass the dense "
                                           r"model's own trunk options"):
        upcycle_state(dense, wider)
    deeper = build(dictionary, "transformer_lm_base", "--decoder-layers", "4")
    with pytest.raises(UpcycleError, match=r"the dense model has 3 decoder layers but the options give 4: pass "
                                           r"--decoder-layers 3"):
        upcycle_state(dense, deeper)


def test_only_a_dense_transformer_lm_is_upcycled(dictionary):
    base = build(dictionary, "transformer_lm_base")
    with pytest.raises(UpcycleError, match="already has expert layers: upcycle the dense model it started from"):
        dense_config({"cfg": {"model": {"_name": "transformer_lm_base"}}, "model": base.state_dict()}, "x.pt")
    with pytest.raises(UpcycleError, match="x.pt is a lstm_lm model; fairseq-base-upcycle starts from a dense "
                                           "transformer_lm"):
        dense_config({"cfg": {"model": {"_name": "lstm_lm"}}, "model": {}}, "x.pt")


@pytest.fixture
def dense_run(dense_runs):
    """The dense transformer_lm that fairseq alone trained (conftest's ``dense_runs``): its save_dir."""
    return dense_runs(False)[0]


def upcycle_command(*args):
    return [os.path.join(BIN, "fairseq-base-upcycle"), *map(str, args)]


@pytest.mark.slow
def test_the_upcycled_checkpoint_scores_as_the_dense_model_in_one_process_and_on_two_workers(
        data_bin, dense_run, tmp_path):
    dense = dense_run / "checkpoint_last.pt"
    flags = ["--base-layers", "1", "--base-moe-freq", "2", "--base-experts", "4", "--data", data_bin / "bin"]
    run(*upcycle_command(dense, "--out", tmp_path / "one.pt", *flags))
    written = run(*upcycle_command(dense, "--out", tmp_path / "two.pt", *flags, "--world-size", "2")).stdout
    assert f"| wrote {tmp_path / 'two-rank-0.pt'}" in written and f"| wrote {tmp_path / 'two-rank-1.pt'}" in written
    reference, one, two = (eval_result_loss(run(*eval_command(data_bin, path, workers)))
                           for path, workers in ((dense, 1), (tmp_path / "one.pt", 1), (tmp_path / "two.pt", 2)))
    for loss in (one, two):
        assert abs(2 ** loss - 2 ** reference) <= 1e-4 * 2 ** reference, (reference, one, two)


@pytest.mark.slow
def test_finetune_from_the_dense_model_or_the_upcycled_file_trains_the_same(data_bin, dense_run, tmp_path):
    """fairseq-train --finetune-from-model DENSE.pt with the options, and from fairseq-base-upcycle's
    file: one model, the same losses."""
    dense = dense_run / "checkpoint_last.pt"
    flags = ["--base-layers", "1", "--base-moe-freq", "2", "--base-experts", "4"]
    run(*upcycle_command(dense, "--out", tmp_path / "base.pt", *flags, "--data", data_bin / "bin"))
    train = [os.path.join(BIN, "fairseq-train"), str(data_bin / "bin"), "--user-dir", "fairseq_base", "--cpu",
             *TINY_MODEL, *flags, "--max-update", "3", "--log-interval", "1"]
    from_dense = run(*train, "--finetune-from-model", dense, "--save-dir", tmp_path / "a")
    from_file = run(*train, "--finetune-from-model", tmp_path / "base.pt", "--save-dir", tmp_path / "b")
    assert "upcycled a dense transformer_lm checkpoint" in from_dense.stdout + from_dense.stderr
    assert sorted(losses(from_dense)) == [1, 2, 3] and losses(from_dense) == losses(from_file)


def test_the_optimizer_state_follows_each_parameter_as_the_parameter_was_moved():
    """Adam's moments of a parameter taken as factor * w: the gradient is the dense one over factor,
    its mean likewise, its mean square over factor squared; transposed and copied per expert as
    the parameter. A new parameter, and per-element state that cannot be rescaled, start empty."""
    fc2, step = torch.randn(3, 5), torch.tensor(7.0)
    dense = {"fc2.weight": {"step": step, "exp_avg": fc2, "exp_avg_sq": fc2 ** 2},
             "fc2.bias": {"step": step, "sum": torch.ones(3)}, "embed": {"step": step, "exp_avg": torch.ones(2)}}
    origins = {"expert.ff2": Origin("fc2.weight", factor=2.0, transposed=True, copies=4),
               "expert.ff2_bias": Origin("fc2.bias", factor=2.0, copies=4), "embed": Origin("embed")}
    ff2, bias, new, embed = upcycle_optimizer_entries(dense, origins, ["expert.ff2", "expert.ff2_bias", "centroids",
                                                                       "embed"])
    assert ff2["step"] is step and ff2["exp_avg"].shape == (4, 5, 3)
    assert torch.equal(ff2["exp_avg"][3], fc2.t() / 2) and torch.equal(ff2["exp_avg_sq"][0], fc2.t() ** 2 / 4)
    assert bias == {} and new == {}  # "sum" (Adagrad's) does not say how it scales; centroids are new
    assert torch.equal(embed["exp_avg"], torch.ones(2))


@pytest.mark.slow
def test_the_upcycled_file_goes_on_with_the_dense_runs_data_schedule_and_optimizer(data_bin, dense_run, tmp_path):
    """--continue-once UPCYCLED.pt goes on from the dense run's update 10 with its next batches,
    learning rate and Adam state: upcycled into one hash-routed expert per FFN slot, which is the
    dense block with gate 1, it trains exactly as the dense run continued (no dropout, whose
    masks the two layers draw in another order); --finetune-from-model starts a new run."""
    dense = dense_run / "checkpoint_last.pt"
    flags = ["--base-layers", "0", "--base-moe-freq", "2", "--base-router", "hash", "--base-experts", "1"]
    written = run(*upcycle_command(dense, "--out", tmp_path / "up.pt", *flags, "--data", data_bin / "bin")).stdout
    assert "--continue-once" in written and "at update 10" in written
    common = [str(data_bin / "bin"), "--user-dir", "fairseq_base", "--cpu", "--dropout", "0", "--max-update", "13",
              "--log-interval", "1"]
    went_on = run(os.path.join(BIN, "fairseq-train"), *common, *DENSE, "--continue-once", dense, "--save-dir",
                  tmp_path / "dense")
    upcycled = run(os.path.join(BIN, "fairseq-train"), *common, *TINY_MODEL, *flags, "--continue-once",
                   tmp_path / "up.pt", "--save-dir", tmp_path / "upcycled")
    assert sorted(losses(went_on)) == sorted(losses(upcycled)) == [11, 12, 13]
    for update, loss in losses(went_on).items():
        assert losses(upcycled)[update] == pytest.approx(loss, abs=2e-3), update
    new_run = run(os.path.join(BIN, "fairseq-train"), *common, *TINY_MODEL, *flags, "--max-update", "2",
                  "--finetune-from-model", tmp_path / "up.pt", "--save-dir", tmp_path / "new")
    assert sorted(losses(new_run)) == [1, 2]


@pytest.mark.slow
def test_the_options_tables_defaults_apply_and_each_file_is_reported_once(data_bin, dense_run, capsys, tmp_path):
    """No --base-* option: the options table's defaults (one BASE layer, one expert per worker);
    on 2 workers each file is reported once, with no notice that does not apply and no warning of ours."""
    import warnings
    from fairseq_base import upcycle
    # As the quick run's dense model: transformer_lm_base saved with --base-layers 0.
    state = torch.load(dense_run / "checkpoint_last.pt", weights_only=False)
    state["cfg"]["model"] = dict(state["cfg"]["model"], _name="transformer_lm_base", base_layers=0, base_moe_freq=0)
    dense = str(tmp_path / "dense.pt")
    torch.save(state, dense)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        upcycle.cli_main([dense, "--out", str(tmp_path / "one.pt"), "--data", str(data_bin / "bin")])
        upcycle.cli_main([dense, "--out", str(tmp_path / "two.pt"), "--data", str(data_bin / "bin"),
                          "--world-size", "2"])
    printed = capsys.readouterr().out.splitlines()
    wrote = [line for line in printed if line.startswith("| wrote")]
    assert wrote == [f"| wrote {tmp_path / name}" for name in ("one.pt", "two-rank-0.pt", "two-rank-1.pt")]
    assert not [line for line in printed if "notice" in line or "--reset-optimizer" in line], printed
    assert not [w for w in caught if "fairseq_base" in w.filename], [str(w.message) for w in caught]
    one = torch.load(tmp_path / "one.pt", weights_only=False)
    assert one["cfg"]["model"]["base_layers"] == 1 and one["model"]["decoder.layers.1.centroids"].shape[0] == 1
    two = torch.load(tmp_path / "two-rank-1.pt", weights_only=False)
    assert two["cfg"]["model"]["base_experts"] == 2 and two["model"]["decoder.layers.1.expert_ids"].tolist() == [1]


@pytest.mark.slow
def test_bad_input_is_one_line(data_bin, dense_run, tmp_path):
    dense = dense_run / "checkpoint_last.pt"
    other = tmp_path / "other"
    other.mkdir()
    (other / "dict.txt").write_text("a 3\nb 2\n")
    cases = {
        "--data": (upcycle_command(dense, "--out", tmp_path / "x.pt", "--data", other),
                   "dictionary has"),
        "no experts": (upcycle_command(dense, "--out", tmp_path / "x.pt", "--base-layers", "0"),
                       "the options add no expert layer: pass --base-layers N and/or --base-moe-freq K"),
        "trunk": ([os.path.join(BIN, "fairseq-train"), str(data_bin / "bin"), "--user-dir", "fairseq_base", "--cpu",
                   *TINY_MODEL, "--decoder-ffn-embed-dim", "48", "--finetune-from-model", dense, "--max-update", "1",
                   "--save-dir", tmp_path / "t"],
                  "of the dense model has shape"),
    }
    for name, (command, fragment) in cases.items():
        result = run(*map(str, command), check=False)
        lines = [line for line in result.stderr.splitlines()
                 if re.search(r"(fairseq-base-upcycle|fairseq_base): error:", line)]
        assert result.returncode != 0 and "Traceback" not in result.stderr, (name, result.stderr[-2000:])
        assert len(lines) == 1 and fragment in lines[0], (name, result.stderr[-2000:])
    assert not (tmp_path / "x.pt").exists()

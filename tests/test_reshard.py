"""Checkpoints across layouts: fairseq-base-reshard and fairseq-eval-lm on 1, 2 and 4 workers, with and
without replicated experts."""

import os
import re
import shutil
import stat

import pytest
import torch

from fairseq_runs import (EVAL, TINY_MODEL, error_messages, eval_command, eval_loss, eval_result_loss, losses, run,
                          run_two_at_a_time, torchrun_train)

from fairseq_base.experts import EXPERT_IDS
from fairseq_base.optimizer_state import state_by_name
from fairseq_base.reshard import ReshardError, cli_main, reshard


@pytest.fixture(scope="module")
def trained(data_bin, tmp_path_factory):
    """A run on W = 4 workers in expert-parallel groups of P = 2, E = 4: one file per expert-parallel
    rank, save_dir/checkpoint_last-rank-{0,1}.pt."""
    save_dir = tmp_path_factory.mktemp("w4p2")
    torchrun_train(4, data_bin, save_dir, "--base-experts", "4", "--base-expert-parallel-size", "2",
                   "--ddp-backend", "legacy_ddp", "--max-update", "20", "--log-interval", "10")
    return save_dir


@pytest.mark.slow
def test_same_perplexity_on_every_layout(data_bin, trained, tmp_path):
    reshard(str(trained / "checkpoint_last-rank-1.pt"), 1, str(tmp_path / "one.pt"))
    reshard(str(trained / "checkpoint_last-rank-0.pt"), 4, str(tmp_path / "four.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["four-rank-0.pt", "four-rank-1.pt", "four-rank-2.pt",
                                                          "four-rank-3.pt", "one.pt"]
    one, two, four_with_replicas, four = map(eval_result_loss, run_two_at_a_time([
        eval_command(data_bin, tmp_path / "one.pt"),
        # The training files (P = 2) by fairseq's suffix rule: on 2 workers, and on 4 with each expert twice.
        eval_command(data_bin, trained / "checkpoint_last.pt", workers=2),
        eval_command(data_bin, trained / "checkpoint_last.pt", workers=4),
        eval_command(data_bin, tmp_path / "four.pt", workers=4)]))  # 4 workers get uneven batch counts
    for loss in (two, four_with_replicas, four):
        assert abs(2 ** loss - 2 ** one) <= 1e-4 * 2 ** one, (one, two, four_with_replicas, four)


def test_round_trip_to_one_file_and_back_is_identical(trained, tmp_path):
    reshard(str(trained / "checkpoint_last-rank-0.pt"), 1, str(tmp_path / "one.pt"))
    reshard(str(tmp_path / "one.pt"), 4, str(tmp_path / "two.pt"), expert_parallel_size=2)
    for rank in range(2):
        before = torch.load(trained / f"checkpoint_last-rank-{rank}.pt", weights_only=False)
        after = torch.load(tmp_path / f"two-rank-{rank}.pt", weights_only=False)
        assert list(before["model"]) == list(after["model"])
        for key, value in before["model"].items():
            assert torch.equal(value, after["model"][key]), key
        optim_before, optim_after = before["last_optimizer_state"], after["last_optimizer_state"]
        assert optim_before["param_groups"] == optim_after["param_groups"]
        for index, entry in optim_before["state"].items():
            for name, value in entry.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(optim_after["state"][index][name]))
        assert before["cfg"]["model"] == after["cfg"]["model"]  # E = 4 and P = 2 written down
        assert after["cfg"]["distributed_training"]["distributed_world_size"] == 4
    assert not (tmp_path / "two-rank-2.pt").exists()  # one file per expert-parallel rank


def test_a_set_with_replicas_is_read_if_they_agree_and_refused_if_they_differ(trained, tmp_path):
    shards = _copy(trained, tmp_path)
    for rank in (2, 3):  # every worker's file: 2 and 3 are replicas of 0 and 1
        shutil.copy(shards / f"checkpoint_last-rank-{rank - 2}.pt", shards / f"checkpoint_last-rank-{rank}.pt")
    reshard(str(shards / "checkpoint_last-rank-3.pt"), 1, str(tmp_path / "from_four.pt"))
    reshard(str(trained / "checkpoint_last-rank-0.pt"), 1, str(tmp_path / "from_two.pt"))
    from_four, from_two = (torch.load(tmp_path / name, weights_only=False)["model"]
                           for name in ("from_four.pt", "from_two.pt"))
    assert all(torch.equal(value, from_two[key]) for key, value in from_four.items())
    expert = next(k for k in from_two if ".experts." in k)  # the stacked experts of file 3: replicas of file 1's
    _edit(shards / "checkpoint_last-rank-3.pt", lambda s: s["model"][expert].view(-1)[0].add_(1e-6))
    with pytest.raises(ReshardError, match="replicas that drifted apart"):
        reshard(str(shards / "checkpoint_last-rank-0.pt"), 1, str(tmp_path / "bad.pt"))


def test_a_layout_that_does_not_fit_is_one_line(trained, tmp_path):
    line = _reshard_cli(trained / "checkpoint_last-rank-0.pt", "--world-size", "4", "--expert-parallel-size", "3",
                        "--out", tmp_path / "x.pt")
    assert line == ("fairseq-base-reshard: error: --expert-parallel-size 3 does not divide --world-size 4; "
                    "use a divisor of 4")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_the_plain_name_of_per_worker_files_is_one_line_for_path_and_read_by_reshard(data_bin, trained,
                                                                                     tmp_path):
    """checkpoint_last.pt does not exist beside checkpoint_last-rank-{0,1}.pt: --path in one process
    says so in one line with both ways on; fairseq-base-reshard reads the set by that name."""
    result = run(*eval_command(data_bin, trained / "checkpoint_last.pt"), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert error_messages(result.stderr) == {
        f"fairseq_base: error: {trained / 'checkpoint_last.pt'} does not exist, but checkpoint_last-rank-0.pt, "
        f"checkpoint_last-rank-1.pt do: the files of a run on several workers. Score them with the same --path on 2 "
        f"(or a multiple of 2) workers, or join them for one process: fairseq-base-reshard "
        f"{trained / 'checkpoint_last-rank-0.pt'} --world-size 1 --out {trained / 'checkpoint_last-joined.pt'}"}
    assert reshard(str(trained / "checkpoint_last.pt"), 1, str(tmp_path / "one.pt")) == [str(tmp_path / "one.pt")]


@pytest.mark.slow
def test_two_kinds_of_checkpoint_under_one_name_are_never_read_silently(data_bin, trained, tmp_path):
    """NAME.pt of a one-process run beside NAME-rank-{0,1}.pt of a run on several workers: fairseq-base-reshard
    and --path stop with one line naming both and how to choose; a shard's own name still reads its set."""
    both = tmp_path / "both"
    shutil.copytree(trained, both)
    reshard(str(trained / "checkpoint_last-rank-0.pt"), 1, str(tmp_path / "one.pt"))
    shutil.copy(tmp_path / "one.pt", both / "checkpoint_last.pt")
    named = (f"{both / 'checkpoint_last.pt'} and checkpoint_last-rank-0.pt, checkpoint_last-rank-1.pt both exist: the "
             f"file of a run in one process and the files of a run on 2 workers, under one name; ")
    line = _reshard_cli(both / "checkpoint_last.pt", "--world-size", "1", "--out", tmp_path / "x.pt")
    assert line == (f"fairseq-base-reshard: error: {named}pass {both / 'checkpoint_last-rank-0.pt'} for the run on "
                    f"several workers, or move those files to another directory to read {both / 'checkpoint_last.pt'}")
    assert reshard(str(both / "checkpoint_last-rank-0.pt"), 1, str(tmp_path / "y.pt")) == [str(tmp_path / "y.pt")]
    result = run(*eval_command(data_bin, both / "checkpoint_last.pt"), check=False)
    assert result.returncode != 0 and "Perplexity" not in result.stdout + result.stderr
    assert error_messages(result.stderr) == {
        f"fairseq_base: error: {named}move one of them to another directory, so that --path names one model"}


@pytest.mark.slow
def test_a_path_that_does_not_exist_is_one_line(data_bin, tmp_path):
    result = run(*eval_command(data_bin, tmp_path / "missing.pt"), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert error_messages(result.stderr) == {
        f"fairseq_base: error: --path {tmp_path / 'missing.pt'}: no such checkpoint; pass the path of a "
        f"checkpoint_*.pt that fairseq-train wrote (relative paths are read from the current directory)"}


@pytest.mark.slow
def test_a_run_is_refused_a_save_dir_with_checkpoints_of_another_number_of_workers(data_bin, trained):
    """In one process, into a --save-dir that holds a run's -rank-* files: one line, and nothing written."""
    before = sorted(p.name for p in trained.iterdir())
    result = run("fairseq-train", str(data_bin / "bin"), "--user-dir", "fairseq_base", "--cpu", *TINY_MODEL,
                 "--base-experts", "4", "--save-dir", str(trained), "--max-update", "1", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert error_messages(result.stderr) == {
        f"fairseq_base: error: --save-dir {trained} holds the checkpoints of a run on several workers "
        f"(checkpoint_best-rank-0.pt, checkpoint_best-rank-1.pt, checkpoint_last-rank-0.pt and 1 more); this run "
        f"in one process would write its own beside them, and resume, --path and fairseq-base-reshard could not tell the two apart: pass another --save-dir (to "
        f"go on from that run here, join or split its files with fairseq-base-reshard --world-size 1 into another "
        f"directory and pass --restore-file)"}
    assert sorted(p.name for p in trained.iterdir()) == before


def test_a_model_without_expert_layers_has_nothing_to_reshard(trained, tmp_path):
    reshard(str(trained / "checkpoint_last-rank-0.pt"), 1, str(tmp_path / "one.pt"))

    def dense(state):
        for key in [k for k in state["model"] if k.endswith(EXPERT_IDS)]:
            del state["model"][key]
        state["cfg"]["model"]["base_layers"] = 0
    _edit(tmp_path / "one.pt", dense)
    line = _reshard_cli(tmp_path / "one.pt", "--world-size", "2", "--out", tmp_path / "two.pt")
    assert line == (f"fairseq-base-reshard: error: {tmp_path / 'one.pt'}: no expert layer in this checkpoint (a "
                    f"transformer_lm_base model without experts (--base-layers 0)): it has nothing to reshard, and "
                    f"fairseq loads it as it is on any number of workers")


def test_eval_lm_on_workers_that_cannot_share_the_files_is_one_line(trained):
    from omegaconf import OmegaConf

    from fairseq_base.errors import BaseLayerConfigError
    from fairseq_base.fairseq_patches.eval_lm import rank_suffix_for_eval
    cfg = OmegaConf.create({"common_eval": {"path": str(trained / "checkpoint_last.pt")},
                            "checkpoint": {"checkpoint_suffix": ""}})
    rank_suffix_for_eval(cfg, rank=3, workers=4)
    assert cfg.checkpoint.checkpoint_suffix == "-rank-1"  # worker 3 holds the experts of expert-parallel rank 1
    cfg.checkpoint.checkpoint_suffix = ""
    with pytest.raises(BaseLayerConfigError, match="a checkpoint of 2 files .* which 3 workers cannot share"):
        rank_suffix_for_eval(cfg, rank=0, workers=3)


@pytest.mark.slow
def test_training_resumes_on_another_world_size(data_bin, trained, tmp_path):
    reshard(str(trained / "checkpoint_last-rank-0.pt"), 1, str(tmp_path / "one.pt"))
    result = run("fairseq-train", str(data_bin / "bin"), "--user-dir", "fairseq_base", "--cpu", *TINY_MODEL,
                 "--base-experts", "4", "--restore-file", str(tmp_path / "one.pt"), "--save-dir",
                 str(tmp_path / "resumed"), "--max-update", "24", "--log-interval", "1")
    assert "Loaded checkpoint" in result.stdout + result.stderr
    assert sorted(losses(result)) == [21, 22, 23, 24]  # optimizer and update count carried over


def _copy(trained, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(trained, shards)
    return shards


def _edit(path, change):
    state = torch.load(path, weights_only=False)
    change(state)
    torch.save(state, path)


@pytest.mark.parametrize("damage,message", [
    (lambda d: os.remove(d / "checkpoint_last-rank-1.pt"), "missing shard"),
    (lambda d: _edit(d / "checkpoint_last-rank-1.pt",
                     lambda s: s["optimizer_history"][-1].update(num_updates=7)), "different updates"),
    (lambda d: _edit(d / "checkpoint_last-rank-1.pt",
                     lambda s: s["model"]["decoder.layer_norm.weight"].add_(1.0)), "another run"),
    (lambda d: shutil.copy(d / "checkpoint_last-rank-0.pt", d / "checkpoint_last-rank-1.pt"), "another run"),
])
def test_bad_shards_are_refused_and_nothing_is_written(trained, tmp_path, damage, message):
    shards = _copy(trained, tmp_path)
    damage(shards)
    out = tmp_path / "out"
    with pytest.raises(ReshardError, match=message):
        reshard(str(shards / "checkpoint_last-rank-0.pt"), 1, str(out / "model.pt"))
    assert not out.exists() or not list(out.iterdir())


def test_world_size_must_divide_the_experts(trained, tmp_path):
    result = run("fairseq-base-reshard", str(trained / "checkpoint_last-rank-0.pt"), "--world-size", "3",
                 "--out", str(tmp_path / "x.pt"), check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == ("fairseq-base-reshard: error: --world-size 3 does not divide the 4 experts "
                                     "of decoder.layers.1; use a divisor of 4 (or --expert-parallel-size with one)")
    assert not list(tmp_path.iterdir())


def test_a_crash_while_writing_leaves_no_output(trained, tmp_path, monkeypatch):
    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        reshard(str(trained / "checkpoint_last-rank-0.pt"), 2, str(tmp_path / "two.pt"))
    assert not list(tmp_path.iterdir())


def test_optimizer_state_that_cannot_be_mapped_is_dropped_with_a_notice(trained, tmp_path, capsys):
    shards = _copy(trained, tmp_path)
    for rank in range(2):
        _edit(shards / f"checkpoint_last-rank-{rank}.pt",  # two parameter groups: no order to regroup by
              lambda s: s["last_optimizer_state"]["param_groups"].append(s["last_optimizer_state"]["param_groups"][0]))
    reshard(str(shards / "checkpoint_last-rank-0.pt"), 1, str(tmp_path / "one.pt"))
    assert "resume training with --reset-optimizer" in capsys.readouterr().out
    assert torch.load(tmp_path / "one.pt", weights_only=False)["last_optimizer_state"] is None


def flatten_optimizer_state(state):
    """``state`` with its optimizer state as --fp16 and --bf16 keep it: one flat entry over all parameters."""
    optim = state["last_optimizer_state"]
    entries = [optim["state"][i] for i in optim["param_groups"][0]["params"]]
    per_element = [key for key, value in entries[0].items() if torch.is_tensor(value) and value.dim()]
    optim["state"] = {0: {key: torch.cat([e[key].reshape(-1) for e in entries]) if key in per_element else value
                          for key, value in entries[0].items()}}
    optim["param_groups"][0]["params"] = [0]


def test_flat_optimizer_state_is_resharded_flat(trained, tmp_path):
    shards = _copy(trained, tmp_path)
    for rank in range(2):
        _edit(shards / f"checkpoint_last-rank-{rank}.pt", flatten_optimizer_state)
    per_parameter = reshard(str(trained / "checkpoint_last-rank-0.pt"), 1, str(tmp_path / "one.pt"))[0]
    flat = reshard(str(shards / "checkpoint_last-rank-0.pt"), 1, str(tmp_path / "one-flat.pt"))[0]
    expected, got = torch.load(per_parameter, weights_only=False), torch.load(flat, weights_only=False)
    flatten_optimizer_state(expected)
    assert got["last_optimizer_state"]["param_groups"] == expected["last_optimizer_state"]["param_groups"]
    for key, value in expected["last_optimizer_state"]["state"][0].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(got["last_optimizer_state"]["state"][0][key])), key


def test_optimizer_state_shaped_otherwise_than_its_parameter_is_not_mapped():
    params = [("weight", torch.Size([4, 3])), ("bias", torch.Size([3]))]
    factored = {"exp_avg_sq_row": torch.zeros(4), "exp_avg_sq_col": torch.zeros(3)}  # as Adafactor's
    optim = {"param_groups": [{"params": [0, 1]}], "state": {0: factored, 1: {"exp_avg_sq": torch.zeros(3)}}}
    assert state_by_name(optim, params) is None
    optim["state"][0] = {"exp_avg_sq": torch.ones(4, 3)}
    assert torch.equal(state_by_name(optim, params)["weight"]["exp_avg_sq"], torch.ones(4, 3))


def _reshard_cli(*args):
    """fairseq-base-reshard's command line, in this process (its start-up costs seconds): the one
    line it exits with. Anything but a one-line error (a traceback) fails the test."""
    with pytest.raises(SystemExit) as exit_:
        cli_main([str(arg) for arg in args])
    line = str(exit_.value.code)
    assert "\n" not in line and line.startswith("fairseq-base-reshard: error: "), line
    return line


class Payload:
    """A pickle that runs a shell command when it is loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_in_a_sibling_shard_never_runs(trained, tmp_path):
    shards = _copy(trained, tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"model": {}, "payload": Payload(marker)}, shards / "checkpoint_last-rank-1.pt")
    line = _reshard_cli(shards / "checkpoint_last-rank-0.pt", "--world-size", "1", "--out", tmp_path / "one.pt")
    assert "checkpoint_last-rank-1.pt holds objects other than tensors" in line
    assert not marker.exists() and not (tmp_path / "one.pt").exists()


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    (_truncate, "is truncated or corrupt"),
    (lambda p: p.write_bytes(os.urandom(4096)), "is truncated or corrupt"),
])
def test_unreadable_input_is_one_line_naming_the_file(trained, tmp_path, damage, message):
    shards = _copy(trained, tmp_path)
    damage(shards / "checkpoint_last-rank-1.pt")
    line = _reshard_cli(shards / "checkpoint_last-rank-0.pt", "--world-size", "1", "--out", tmp_path / "one.pt")
    assert f"checkpoint_last-rank-1.pt {message}" in line
    assert not (tmp_path / "one.pt").exists()


@pytest.mark.parametrize("out,world_size,message", [
    ("{tmp}", 1, "is a directory; name a file"),
    ("/proc/fairseq_base_reshard_test.pt", 1, "cannot write /proc/fairseq_base_reshard_test.pt"),
    ("{shards}/checkpoint_last-rank-1.pt/model.pt", 1, "cannot create directory"),
    ("{shards}/checkpoint_last-rank-0.pt", 1, "would overwrite the input"),
    ("{shards}/checkpoint_last.pt", 2, "would overwrite the input"),
])
def test_bad_output_is_one_line(trained, tmp_path, out, world_size, message):
    shards = _copy(trained, tmp_path)
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    line = _reshard_cli(shards / "checkpoint_last-rank-0.pt", "--world-size", world_size,
                        "--out", out.format(tmp=tmp_path, shards=shards))
    assert message in line
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before


def test_a_stale_larger_set_at_the_output_is_refused(trained, tmp_path):
    reshard(str(trained / "checkpoint_last-rank-0.pt"), 4, str(tmp_path / "model.pt"))
    line = _reshard_cli(trained / "checkpoint_last-rank-0.pt", "--world-size", "2", "--out", tmp_path / "model.pt")
    assert "model-rank-2.pt (and 1 more) would be left beside the new files" in line


def test_outputs_get_the_mode_of_fairseqs_checkpoints(trained, tmp_path):
    reshard(str(trained / "checkpoint_last-rank-0.pt"), 2, str(tmp_path / "two.pt"))
    fairseq_mode = stat.S_IMODE(os.stat(trained / "checkpoint_last-rank-0.pt").st_mode)
    for rank in range(2):
        assert stat.S_IMODE(os.stat(tmp_path / f"two-rank-{rank}.pt").st_mode) == fairseq_mode


@pytest.mark.parametrize("stage", ["write", "rename"])
def test_a_failure_at_the_second_file_changes_nothing(trained, tmp_path, monkeypatch, stage):
    """All or nothing: the old set at the output names stays as it was, no temporary is left."""
    old = {f"two-rank-{r}.pt": f"old {r}".encode() for r in range(2)}
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)
    module, name = (torch, "save") if stage == "write" else (os, "replace")
    real, calls = getattr(module, name), []

    def second_call_fails(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, second_call_fails)
    with pytest.raises(ReshardError, match="cannot write .*two-rank-1.pt: No space left on device; nothing was changed"):
        reshard(str(trained / "checkpoint_last-rank-0.pt"), 2, str(tmp_path / "two.pt"))
    monkeypatch.setattr(module, name, real)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old


def test_torch_saves_full_disk_error_is_one_line_and_changes_nothing(trained, tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError, not an OSError."""
    old = {f"two-rank-{r}.pt": f"old {r}".encode() for r in range(2)}
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    line = _reshard_cli(trained / "checkpoint_last-rank-0.pt", "--world-size", "2", "--out", tmp_path / "two.pt")
    assert line.startswith("fairseq-base-reshard: error: cannot write ") and "inline_container.cc" in line, line
    assert "nothing was changed" in line
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old


def test_non_finite_values_stop_reshard_naming_the_tensor(trained, tmp_path):
    shards = _copy(trained, tmp_path)
    key = "decoder.layers.1.experts.sublayers.0.ff1_weight"
    _edit(shards / "checkpoint_last-rank-1.pt", lambda s: s["model"][key].view(-1)[3].fill_(float("inf")))
    line = _reshard_cli(shards / "checkpoint_last-rank-0.pt", "--world-size", "1", "--out", tmp_path / "one.pt")
    assert f"checkpoint_last-rank-1.pt: tensor model/{key} holds inf or NaN" in line


@pytest.mark.slow
def test_loading_a_checkpoint_with_nan_is_refused_naming_the_tensor(data_bin, trained, tmp_path):
    reshard(str(trained / "checkpoint_last-rank-0.pt"), 1, str(tmp_path / "one.pt"))
    key = "decoder.layers.0.fc1.weight"
    _edit(tmp_path / "one.pt", lambda s: s["model"][key].view(-1)[0].fill_(float("nan")))
    for cmd in (["fairseq-train", str(data_bin / "bin"), "--user-dir", "fairseq_base", "--cpu", *TINY_MODEL,
                 "--base-experts", "4", "--restore-file", str(tmp_path / "one.pt"), "--save-dir",
                 str(tmp_path / "resumed"), "--max-update", "24"],
                ["fairseq-eval-lm", str(data_bin / "bin"), "--path", str(tmp_path / "one.pt"), *EVAL]):
        result = run(*cmd, check=False)
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if line.startswith("fairseq_base: error:")]
        assert len(errors) == 1 and f"tensor model/{key} holds inf or NaN" in errors[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_eval_lm_takes_the_checkpoints_block_length_and_never_reports_zero_tokens(data_bin, trained, tmp_path):  # noqa: E501
    reshard(str(trained / "checkpoint_last-rank-0.pt"), 1, str(tmp_path / "one.pt"))
    without = [a for a in EVAL if a not in ("--tokens-per-sample", "64")]
    assert len(without) == len(EVAL) - 2
    result = run("fairseq-eval-lm", str(data_bin / "bin"), "--path", str(tmp_path / "one.pt"), *without)
    log = result.stdout + result.stderr
    assert "--tokens-per-sample 64, as the checkpoint was trained" in log
    assert float(re.search(r"Loss \(base 2\): ([0-9.]+)", log).group(1)) == pytest.approx(
        eval_loss(data_bin, tmp_path / "one.pt"), abs=1e-4)  # the same as with --tokens-per-sample 64
    # Blocks longer than the model's positions are all skipped: one line, not "Perplexity: 1.00".
    result = run("fairseq-eval-lm", str(data_bin / "bin"), "--path", str(tmp_path / "one.pt"), *without,
                 "--tokens-per-sample", "1024", check=False)
    assert result.returncode != 0 and "Perplexity" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fairseq_base: error:")]
    assert len(errors) == 1 and "scored 0 tokens" in errors[0] and "--tokens-per-sample" in errors[0]


@pytest.mark.slow
def test_a_resharded_two_worker_checkpoint_samples_and_decodes_incrementally(data_bin, trained, tmp_path):  # noqa: E501
    from test_generation import (assert_incremental_decoding_matches_full_scoring, assert_samples_and_scores, hub,
                                 interactive)
    reshard(str(trained / "checkpoint_last-rank-0.pt"), 1, str(tmp_path / "one.pt"))
    lm = hub(tmp_path / "one.pt", data_bin)
    assert_samples_and_scores(lm)
    assert_incremental_decoding_matches_full_scoring(lm)
    interactive(tmp_path / "one.pt", data_bin, "--sampling", "--sampling-topk", "5", "--beam", "1")

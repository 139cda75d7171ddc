"""fairseq-train then fairseq-eval-lm in one process, as subprocesses, on real English text
(tiny Shakespeare from ../shared, or the Brown corpus that scripts/setup.sh fetches)."""

import collections
import math
import re
import sys

import pytest

from fairseq_runs import run


def unigram_perplexity(train_lines, test_lines):
    """Per-token perplexity of an add-one unigram model, counting end-of-line as fairseq does."""
    counts = collections.Counter(tok for line in train_lines for tok in line.split() + ["</s>"])
    vocab = len(counts) + 1
    total = sum(counts.values())
    tokens = [tok for line in test_lines for tok in line.split() + ["</s>"]]
    log_prob = sum(math.log((counts[tok] + 1) / (total + vocab)) for tok in tokens)
    return math.exp(-log_prob / len(tokens))


@pytest.mark.slow
def test_train_then_eval_lm_beats_unigram(data_bin):
    save_dir = data_bin / "checkpoints"
    train = run(
        "fairseq-train", str(data_bin / "bin"), "--user-dir", "fairseq_base", "--task", "language_modeling",
        "--arch", "transformer_lm_base", "--base-layers", "1", "--base-experts", "4",
        "--decoder-layers", "2", "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128",
        "--decoder-attention-heads", "4", "--tokens-per-sample", "128", "--sample-break-mode", "none",
        "--batch-size", "16", "--optimizer", "adam", "--lr", "0.003", "--max-update", "150",
        "--log-interval", "50", "--log-format", "simple", "--save-dir", str(save_dir),
        "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--seed", "1",
        "--tensorboard-logdir", str(data_bin / "tb"))
    log = train.stdout + train.stderr
    train_lines = [line for line in log.splitlines() if "| train_inner |" in line]
    valid_lines = [line for line in log.splitlines() if "valid on 'valid' subset" in line]
    assert train_lines and valid_lines
    for line in train_lines[-1:] + valid_lines[-1:]:
        assert "base1_top1" in line and "base1_load_max" in line, line
    # No process group in one process: a plain checkpoint file, no -rank-N suffix.
    assert (save_dir / "checkpoint_last.pt").exists()
    events = b"".join(p.read_bytes() for p in (data_bin / "tb").rglob("events.out.tfevents.*"))
    assert b"base1_top1" in events and b"base1_load_max" in events

    result = run("fairseq-eval-lm", str(data_bin / "bin"), "--user-dir", "fairseq_base",
                 "--path", str(save_dir / "checkpoint_last.pt"), "--gen-subset", "valid",
                 "--tokens-per-sample", "128", "--batch-size", "16", "--cpu", "--num-workers", "0")
    match = re.search(r"Perplexity: ([0-9.]+)", result.stdout + result.stderr)
    assert match, result.stderr[-2000:]
    model_ppl = float(match.group(1))
    text = (data_bin / "train.txt").read_text().splitlines(), (data_bin / "valid.txt").read_text().splitlines()
    unigram_ppl = unigram_perplexity(*text)
    assert model_ppl < 0.8 * unigram_ppl, (model_ppl, unigram_ppl)


def test_bad_option_is_one_line_without_traceback(data_bin, tmp_path):
    result = run("fairseq-train", str(data_bin / "bin"), "--user-dir", "fairseq_base",
                 "--task", "language_modeling", "--arch", "transformer_lm_base", "--decoder-layers", "2",
                 "--base-positions", "5", "--batch-size", "4", "--cpu", "--max-update", "1",
                 "--save-dir", str(tmp_path), check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fairseq_base: error:")]
    assert len(errors) == 1 and "--base-positions" in errors[0] and "0 to --decoder-layers (2)" in errors[0]


def test_module_entry_point_importable():
    # The plugin must import without fairseq's libbase (which the PyPI fairseq lacks).
    run(sys.executable, "-c", "import fairseq_base, sys; assert 'fairseq.libbase' not in sys.modules")

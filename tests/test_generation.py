"""Sampling and scoring from BASE language models, for every router: the hub interface
(from_pretrained, sample, score) and fairseq-interactive (sampling and beam search), and
incremental decoding that gives the same log-probabilities as scoring the whole sequence."""

import os

import pytest
import torch

from fairseq_runs import BIN, run

from fairseq_base.models.transformer_lm_base import TransformerLanguageModelBase
from fairseq_base.router import ROUTER_RECORDS

PROMPT = "T h e _ k i n g"
ROUTERS = [record.name for record in ROUTER_RECORDS]


def hub(checkpoint, data):
    lm = TransformerLanguageModelBase.from_pretrained(os.path.dirname(checkpoint), os.path.basename(checkpoint),
                                                      data_name_or_path=str(data / "bin"))
    return lm.eval()


def assert_incremental_decoding_matches_full_scoring(lm, text=PROMPT):
    """Each token's log-probability given the ones before it, from one forward pass over the
    whole sequence and from fairseq's incremental decoding, one token at a time."""
    model = lm.models[0]
    tokens = lm.encode(text)[None, :-1]  # without the final </s>
    with torch.no_grad():
        full = model.get_normalized_probs(model(tokens), log_probs=True)[0]
        state, steps = {}, []
        for t in range(tokens.size(1)):
            out = model.decoder(tokens[:, : t + 1], incremental_state=state)
            steps.append(model.get_normalized_probs(out, log_probs=True)[0, -1])
    assert torch.allclose(torch.stack(steps), full, atol=1e-5), (torch.stack(steps) - full).abs().max()


def assert_samples_and_scores(lm):
    torch.manual_seed(0)
    sampled = lm.sample(PROMPT, beam=1, sampling=True, sampling_topk=5, max_len_b=12)
    searched = lm.sample(PROMPT, beam=2, max_len_b=12)
    for text in (sampled, searched):
        assert text.startswith(PROMPT) and len(text.split()) > len(PROMPT.split()), text
    scores = lm.score(PROMPT)["positional_scores"]
    assert scores.numel() == len(PROMPT.split()) and bool(torch.isfinite(scores).all()) and bool((scores < 0).all())


# lossfree in the default tier: the model test_routers.py's default case trains (``router_runs``).
@pytest.mark.parametrize("router", ["lossfree"] + [pytest.param(name, marks=pytest.mark.slow)
                                                   for name in ROUTERS if name != "lossfree"])
def test_hub_samples_and_scores_and_decodes_incrementally(data_bin, router_runs, router):
    lm = hub(router_runs(router)[0] / "checkpoint_last.pt", data_bin)
    assert_samples_and_scores(lm)
    assert_incremental_decoding_matches_full_scoring(lm)


def interactive(checkpoint, data, *flags):
    result = run(os.path.join(BIN, "fairseq-interactive"), str(data / "bin"), "--task", "language_modeling",
                 "--user-dir", "fairseq_base", "--path", str(checkpoint), "--cpu", "--max-len-b", "12", *flags,
                 input=PROMPT + "\n")
    hypotheses = [line for line in result.stdout.splitlines() if line.startswith("H-0")]
    assert len(hypotheses) == 1, result.stdout[-2000:] + result.stderr[-2000:]
    return hypotheses[0]


@pytest.mark.slow
@pytest.mark.parametrize("router", ["balanced", "hash"])
def test_interactive_samples_and_searches(data_bin, router_runs, router):
    checkpoint = router_runs(router)[0] / "checkpoint_last.pt"
    interactive(checkpoint, data_bin, "--sampling", "--sampling-topk", "5", "--beam", "1", "--seed", "1")
    interactive(checkpoint, data_bin, "--beam", "2")

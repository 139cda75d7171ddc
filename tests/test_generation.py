"""Sampling and scoring from BASE language models, for every router: the hub interface
(from_pretrained, sample, score) and fairseq-interactive (sampling and beam search), and
incremental decoding that gives the same log-probabilities as scoring the whole sequence."""

import os
import sys

import pytest
import torch

from fairseq_runs import BIN, console_script, error_messages, run

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


# Prompts of different lengths, dealt out to the workers: on 4 workers one worker has two and
# the others one; on 2 workers the counts differ too. A worker's prompts are generated as one batch.
PROMPTS = ["T h e", "T h e _ k i n g _ o f", "A", "I n _ t h e _ b e g i n n i n g _ w a s", "W h"]
DECODINGS = {"greedy": dict(beam=1), "beam": dict(beam=3), "top-k": dict(beam=1, sampling=True, sampling_topk=5)}


def words(lm, prompts, decoding, seed=3):
    """For each prompt (one batch), the first hypothesis' tokens, from ``seed``."""
    torch.manual_seed(seed)
    hypotheses = lm.generate([lm.encode(prompt) for prompt in prompts], max_len_b=10, **DECODINGS[decoding])
    return [hypos[0]["tokens"].tolist() for hypos in hypotheses]


def _generate_on_workers(rank, world_size, folder, data):
    from fairseq_base.models.transformer_lm_base import TransformerLanguageModelBase
    lm = TransformerLanguageModelBase.from_pretrained(folder, "model.pt", data_name_or_path=data).eval()
    experts = {layer.name: layer.expert_ids.tolist() for layer in lm.models[0].modules() if hasattr(layer, "expert_ids")}
    mine = PROMPTS[rank::world_size]
    return experts, {decoding: words(lm, mine, decoding) for decoding in DECODINGS}


@pytest.mark.slow
@pytest.mark.parametrize("router", ROUTERS)
def test_workers_each_holding_their_experts_generate_the_words_of_one_process(data_bin, router_runs, router, tmp_path):
    """Greedy search, beam search and top-k sampling on 2 and 4 gloo workers, each with prompts of
    its own (different lengths and numbers), give the words that the one-process model gives for
    the same batches and seed; each worker holds only its own experts."""
    from fairseq_base.reshard import reshard
    from distributed_utils import run_workers

    checkpoint = router_runs(router)[0] / "checkpoint_last.pt"
    one = hub(checkpoint, data_bin)
    for workers in (2, 4):
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        reshard(str(checkpoint), workers, str(folder / "model.pt"))
        results = run_workers(_generate_on_workers, workers, str(folder), str(data_bin / "bin"), timeout=300)
        for rank, (experts, generated) in enumerate(results):
            local = 4 // workers  # of the run's 4 experts per layer
            assert all(ids == list(range(rank * local, (rank + 1) * local)) for ids in experts.values()), experts
            mine = PROMPTS[rank::workers]
            for decoding, tokens in generated.items():
                assert tokens == words(one, mine, decoding), (workers, rank, decoding)


def hypotheses(result):
    """[(H-id, words)] and [score] of the hypotheses printed: the words must be the same on any
    layout, the scores within rounding (the experts' products run on other batches of rows)."""
    lines = [line.split("\t") for line in result.stdout.splitlines() if line.startswith("H-")]
    assert lines, result.stdout[-2000:] + result.stderr[-2000:]
    return [(name, words) for name, _, words in lines], [float(score) for _, score, _ in lines]


def assert_same_hypotheses(printed, reference):
    (words, scores), (reference_words, reference_scores) = printed, reference
    assert words == reference_words
    assert scores == pytest.approx(reference_scores, rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_interactive_and_generate_on_two_workers_print_what_one_process_prints(data_bin, router_runs, tmp_path):
    """fairseq-interactive under torchrun (prompts on stdin) and under fairseq's spawn launch
    (--input FILE), and fairseq-generate under torchrun, each worker holding its experts: worker 0
    reads and prints, in input order, exactly what one process prints."""
    from fairseq_base.reshard import reshard
    checkpoint = router_runs("balanced")[0] / "checkpoint_last.pt"
    reshard(str(checkpoint), 2, str(tmp_path / "model.pt"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(prompt + "\n" for prompt in PROMPTS))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    asked = [str(data_bin / "bin"), "--task", "language_modeling", "--user-dir", "fairseq_base", "--cpu",
             "--max-len-b", "10", "--buffer-size", "2", "--batch-size", "2", "--seed", "5"]
    for decoding in (["--beam", "2"], ["--sampling", "--sampling-topk", "5", "--beam", "1"]):
        one = hypotheses(run(os.path.join(BIN, "fairseq-interactive"), *asked, *decoding, "--path", checkpoint,
                             input=prompts.read_text()))
        assert [name for name, _ in one[0]] == [f"H-{i}" for i in range(len(PROMPTS))]
        on_torchrun = run(*torchrun, console_script("fairseq-interactive"), *asked, *decoding, "--path",
                          tmp_path / "model.pt", "--distributed-backend", "gloo", input=prompts.read_text())
        spawned = run(os.path.join(BIN, "fairseq-interactive"), *asked, *decoding, "--path", tmp_path / "model.pt",
                      "--distributed-world-size", "2", "--distributed-backend", "gloo", "--input", prompts)
        assert_same_hypotheses(hypotheses(on_torchrun), one)
        assert_same_hypotheses(hypotheses(spawned), one)
    scored = [str(data_bin / "bin"), "--task", "language_modeling", "--user-dir", "fairseq_base", "--cpu",
              "--gen-subset", "valid", "--score-reference", "--sample-break-mode", "eos", "--tokens-per-sample", "64",
              "--batch-size", "8", "--num-workers", "0"]
    one = hypotheses(run(os.path.join(BIN, "fairseq-generate"), *scored, "--path", checkpoint))
    two = hypotheses(run(*torchrun, console_script("fairseq-generate"), *scored, "--path", tmp_path / "model.pt",
                         "--distributed-backend", "gloo"))
    assert_same_hypotheses(two, one)


def _fail_on_one_worker(rank, world_size, folder, data):
    from fairseq_base.models.transformer_lm_base import TransformerLanguageModelBase
    lm = TransformerLanguageModelBase.from_pretrained(folder, "model.pt", data_name_or_path=data).eval()
    prompt = " ".join(["a"] * 200) if rank == 1 else PROMPTS[0]  # longer than the model's 64 positions
    try:
        lm.generate([lm.encode(prompt)], beam=1, max_len_b=5)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _load_on_workers(rank, world_size, folder, data):
    from fairseq_base.models.transformer_lm_base import TransformerLanguageModelBase
    try:
        TransformerLanguageModelBase.from_pretrained(folder, "model.pt", data_name_or_path=data)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "loaded"


@pytest.mark.slow
def test_one_workers_bad_prompt_stops_every_worker_with_its_line_and_bad_layouts_are_one_line(
        data_bin, router_runs, tmp_path):
    from fairseq_base.reshard import reshard
    from distributed_utils import run_workers

    checkpoint = router_runs("balanced")[0] / "checkpoint_last.pt"
    reshard(str(checkpoint), 2, str(tmp_path / "model.pt"))
    data = str(data_bin / "bin")
    failed = run_workers(_fail_on_one_worker, 2, str(tmp_path), data, timeout=300)
    assert failed[0] == failed[1] and failed[0].startswith("WorkerFailed: ") and "invalid" in failed[0], failed
    loaded = run_workers(_load_on_workers, 3, str(tmp_path), data, timeout=300)
    assert all("a checkpoint of 2 files (one per expert-parallel rank), which 3 workers cannot share" in line
               for line in loaded), loaded
    # A router option that the checkpoint lacks, on 2 workers (torchrun) and in one process.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                console_script("fairseq-interactive"), "--distributed-backend", "gloo"]
    for launch, path in ((torchrun, tmp_path / "model.pt"), ([os.path.join(BIN, "fairseq-interactive")], checkpoint)):
        for override, says in (("{'base_router': 'lossfree'}", "holds the parameters of base_router='balanced'"),
                               ("{'base_routr': 'hash'}", "base_routr: no option of transformer_lm_base")):
            result = run(*launch, data, "--task", "language_modeling", "--user-dir", "fairseq_base", "--cpu",
                         "--path", path, "--model-overrides", override, input=PROMPTS[0] + "\n", check=False)
            errors = error_messages(result.stderr)
            assert result.returncode != 0 and len(errors) == 1 and says in errors.pop(), result.stderr[-2000:]
    torch.save(torch.load(checkpoint, weights_only=False), tmp_path / "model.pt")  # both kinds under one name
    loaded = run_workers(_load_on_workers, 2, str(tmp_path), data, timeout=300)
    assert all("both exist" in line for line in loaded), loaded

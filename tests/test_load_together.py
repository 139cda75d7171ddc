"""Workers decide together, then act, when they load checkpoints (``Trainer.load_checkpoint``,
replaced in ``fairseq_patches/checkpoint_files.py``): each worker reads its own file first, the
workers gather what each found, and all load the same agreed save, or all stop with the same
line. Here without fairseq-train: the decision on records, and the replacement on 2 gloo workers
in this process with a stand-in trainer (the multi-process runs are in ``test_saves.py``)."""

import os
from types import SimpleNamespace

import pytest
import torch

from distributed_utils import run_workers
from fairseq_base import checkpoints
from fairseq_base.fairseq_patches import checkpoint_files


def record(exists=True, problem=None, run_id="run", updates=10, path="checkpoint_last-rank-0.pt"):
    return {"exists": exists, "problem": problem, "run_id": run_id, "num_updates": updates, "file": path}


def test_the_workers_load_a_file_only_if_every_worker_can_and_they_belong_to_one_save():
    assert checkpoint_files.problem_with([record(), record()]) is None
    assert checkpoint_files.problem_with([record(exists=False), record(exists=False)]) is None  # a new run
    missing = checkpoint_files.problem_with([record(), record(exists=False, path="checkpoint_last-rank-1.pt")])
    assert missing == "checkpoint_last-rank-1.pt does not exist on worker 1 (the other workers have theirs)"
    assert checkpoint_files.problem_with([record(), record(problem="x.pt is empty")]) == "x.pt is empty"
    assert "(different updates)" in checkpoint_files.problem_with([record(), record(updates=5)])
    assert "(different runs)" in checkpoint_files.problem_with([record(), record(run_id="other")])


def save(path, updates, run_id="run", value=0.0):
    """A small checkpoint of a model with one expert parameter, as fairseq's readers take it."""
    state = {"model": {"shared": torch.full((2,), value), "experts": torch.ones(2)},
             "optimizer_history": [{"num_updates": updates, "criterion_name": "c", "optimizer_name": "o",
                                    "lr_scheduler_state": {}}],
             "extra_state": {"train_iterator": {"epoch": 1}}}
    checkpoints.stamp(state, run_id, updates)
    torch.save(state, path)


class StandInTrainer:
    """What the replacement reads of fairseq's Trainer; ``loaded`` lists what fairseq's loading was given."""

    def __init__(self, rank, workers, save_dir):
        self.data_parallel_rank, self.data_parallel_world_size = rank, workers
        self.data_parallel_process_group = None
        self.checkpoint_suffix = f"-rank-{rank}"
        self.cfg = SimpleNamespace(checkpoint=SimpleNamespace(save_dir=save_dir))
        torch.manual_seed(0)  # the same shared parameters on every worker
        self.model = torch.nn.Linear(2, 2)
        self.model.weight.expert = True
        self.loaded = []

    def get_model(self):
        return self.model


def load_as_fairseq(trainer, filename, *args, **kwargs):
    """fairseq's loading, as far as these tests need it: its read of the file."""
    trainer.loaded.append(os.path.basename(filename))
    if os.path.isfile(filename):
        checkpoint_files.load_checkpoint_to_cpu(filename, load_on_all_ranks=True)
    return {}


def load_on_worker(rank, workers, cases):
    """{case: (files fairseq's loading was given, the line the worker stopped with or None)} on worker
    ``rank``, for each (case, save dir, rank on which fairseq's loading raises) of ``cases``."""
    results = {}
    for case, save_dir, fail_on_rank in cases:
        trainer = StandInTrainer(rank, workers, save_dir)

        def fairseq_load(self, filename, *args, fail=rank == fail_on_rank, **kwargs):
            if fail:
                raise RuntimeError("Cannot load model parameters from checkpoint")
            return load_as_fairseq(self, filename)

        checkpoint_files.FAIRSEQ_TRAINER_LOAD_CHECKPOINT = fairseq_load  # in this spawned worker only
        try:
            checkpoint_files.trainer_load_checkpoint(trainer, os.path.join(save_dir, f"checkpoint_last-rank-{rank}.pt"))
            results[case] = trainer.loaded, None
        except checkpoints.CheckpointError as err:
            results[case] = trainer.loaded, str(err)
    return results


def two_saves(save_dir):
    """checkpoint_1_{5,10}-rank-{0,1} and checkpoint_last-rank-{0,1} (update 10) of one run."""
    for rank in range(2):
        for updates in (5, 10):
            save(save_dir / f"checkpoint_1_{updates}-rank-{rank}.pt", updates)
        save(save_dir / f"checkpoint_last-rank-{rank}.pt", 10)
    return save_dir


def unreadable_and_newest_set_incomplete(save_dir):
    (save_dir / "checkpoint_last-rank-1.pt").write_bytes(b"")
    os.remove(save_dir / "checkpoint_1_10-rank-0.pt")


def no_complete_set(save_dir):
    (save_dir / "checkpoint_last-rank-0.pt").write_bytes(b"")
    for name in ("checkpoint_1_5-rank-1.pt", "checkpoint_1_10-rank-1.pt"):
        os.remove(save_dir / name)


# case: (how its save directory is damaged, the rank whose fairseq loading raises)
CASES = {"readable": (lambda save_dir: None, None),
         "unreadable, newest set incomplete": (unreadable_and_newest_set_incomplete, None),
         "no complete set": (no_complete_set, None),
         "fairseq's loading raises on worker 1": (lambda save_dir: None, 1),
         "a new run": (lambda save_dir: [os.remove(p) for p in save_dir.iterdir()], None)}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """{case: [(files, line) of worker 0, of worker 1]}, all cases in one start of 2 workers."""
    cases = []
    for case, (damage, fail_on_rank) in CASES.items():
        save_dir = two_saves(tmp_path_factory.mktemp("saves"))
        damage(save_dir)
        cases.append((case, str(save_dir), fail_on_rank))
    by_rank = run_workers(load_on_worker, 2, cases, timeout=300)
    return {case: [by_rank[0][case], by_rank[1][case]] for case, _, _ in cases} | {"dirs": {c: d for c, d, _ in cases}}


def test_files_that_every_worker_reads_are_loaded_as_they_are(loaded):
    assert loaded["readable"] == [(["checkpoint_last-rank-0.pt"], None), (["checkpoint_last-rank-1.pt"], None)]
    assert loaded["a new run"] == [(["checkpoint_last-rank-0.pt"], None), (["checkpoint_last-rank-1.pt"], None)]


def test_one_workers_unreadable_file_sends_every_worker_to_the_same_complete_set(loaded):
    assert loaded["unreadable, newest set incomplete"] == [(["checkpoint_1_5-rank-0.pt"], None),
                                                           (["checkpoint_1_5-rank-1.pt"], None)]


def test_with_no_complete_set_every_worker_stops_with_the_same_line_before_loading(loaded):
    (loaded0, line0), (loaded1, line1) = loaded["no complete set"]
    assert loaded0 == loaded1 == [] and line0 == line1
    assert "checkpoint_last-rank-0.pt is empty (0 bytes)" in line0 and "no set of checkpoint_E_U-rank-*.pt" in line0


def test_an_exception_in_fairseqs_loading_on_one_worker_stops_every_worker_with_its_line(loaded):
    case = "fairseq's loading raises on worker 1"
    (_, line0), (_, line1) = loaded[case]
    path = os.path.join(loaded["dirs"][case], "checkpoint_last-rank-1.pt")
    assert line0 == line1 == f"loading {path} failed on worker 1: Cannot load model parameters from checkpoint"

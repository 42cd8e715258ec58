#!/usr/bin/env bash
# PEFT's own test matrix for LFMA: peft's tests/test_custom_models.py (from the sdist of the installed
# peft version) with LFMA rows added beside FourierFT's by patch_tests.py, LFMA rows only. Nothing of
# PEFT's tests is kept in this repository: each run downloads (once) and unpacks a fresh copy into
# build/peft_matrix/ and patches it.
#
#   scripts/peft_matrix/run.sh                      # every LFMA row (about 600 cases, ~1 minute)
#   scripts/peft_matrix/run.sh -k "lfma and merge"  # extra pytest arguments are appended
#   MIXED=1 scripts/peft_matrix/run.sh              # plus the mixed-adapter-batch rows
#   SELECT=fourierft scripts/peft_matrix/run.sh     # FourierFT's rows instead, as a control
#
# Needs `make venv` first; installs the tests' own imports (diffusers, datasets, parameterized) into
# .venv with torch and the other installed versions pinned.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
WORK=$REPO/build/peft_matrix
SELECT=${SELECT:-lfma}
VERSION=$("$PY" -c 'import peft; print(peft.__version__)')
SDIST=$WORK/sdist/peft-$VERSION.tar.gz

if ! "$PY" -c 'import diffusers, datasets, parameterized, yaml, scipy' 2>/dev/null; then
    mkdir -p "$WORK"
    "$PY" -m pip freeze | grep -iE '^(torch|transformers|peft|huggingface.hub|numpy|safetensors|accelerate|tokenizers)==' \
        > "$WORK/constraints.txt"
    "$PY" -m pip install -q -c "$WORK/constraints.txt" diffusers datasets parameterized pyyaml scipy
fi
[[ -f "$SDIST" ]] || "$PY" -m pip download -q --no-deps --no-binary :all: "peft==$VERSION" -d "$WORK/sdist"

ROOT=$WORK/peft-$VERSION
rm -rf "$ROOT"
tar xzf "$SDIST" -C "$WORK"
"$PY" "$REPO/scripts/peft_matrix/patch_tests.py" "$ROOT" ${MIXED:+--mixed}
echo "lfma_kernels under test: $(git -C "$REPO" log -1 --format='%h %s' | cut -c1-100)"
git -C "$REPO" status --short -- lfma_kernels | sed 's/^/    uncommitted: /'

cd "$ROOT"
export HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # the tests/ package (relative imports)
# -o addopts="": the sdist's pyproject adds --cov, and pytest-cov is not installed.
exec "$PY" -m pytest tests/test_custom_models.py -q -p no:cacheprovider -o addopts="" -k "$SELECT" -rfEs \
    --tb=short "$@"

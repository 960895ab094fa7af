#!/usr/bin/env bash
# Creates .venv (if missing) and installs raysearch with the given extras. Needs Python 3.10+ and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e ".${extras}" 2>&1 | grep -vE "is ignored|^\s*$" || true
.venv/bin/python -c "import raysearch, torch, ray; print(f'raysearch {raysearch.__version__}, torch {torch.__version__}, ray {ray.__version__}')"

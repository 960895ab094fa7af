#!/usr/bin/env bash
# Creates .venv (if missing) and installs raysearch with the given extras. Needs Python 3.10+ and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras}"
.venv/bin/python -c "import raysearch, torch, ray; print(f'raysearch {raysearch.__version__}, torch {torch.__version__}, ray {ray.__version__}')"

#!/usr/bin/env bash
# The device check: the CUDA, AMP (bf16), channels_last and DDP paths run for real, one line per
# check with its figures (see raysearch/bench/gpu_check.py). Runs from the source tree with the
# machine's own Python: it needs torch, torchvision, numpy, pandas, pyarrow, Pillow, PyYAML and
# rich, and neither Ray (its check is skipped without it) nor Optuna nor fsspec.
#
#   scripts/gpu_check.sh          on a machine with a GPU (under 5 minutes on one GPU)
#   scripts/gpu_check.sh --cpu    the same checks in small, on the CPU (tests/bench runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec "$PY" -m raysearch.bench.gpu_check "$@"

#!/usr/bin/env bash
# Installs raysearch with its test extras into .venv and runs the test suite (CPU, ~minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "[test]"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
.venv/bin/lint-imports --no-cache --no-logo  # the stage contracts in pyproject.toml
# Whole benchmarks (marker `bench`) are left out: `bash scripts/test.sh -m bench` runs them.
exec .venv/bin/python -m pytest -q --durations=30 -m "not bench" "$@"

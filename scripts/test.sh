#!/usr/bin/env bash
# Installs raysearch with its test extras into .venv and runs the test suite (CPU, ~minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "[test]"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -q "$@"

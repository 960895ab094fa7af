#!/usr/bin/env bash
# Installs raysearch with its test extras into .venv and runs the test suite (CPU, ~minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "[test]"
# The HTML report's browser test opens the report in Debian's headless Chromium (Playwright is
# in the test extras; no browser download). Installed here when missing, as root with apt-get.
if [ ! -x /usr/bin/chromium-headless-shell ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq chromium-headless-shell
  else
    echo "scripts/test.sh: tests/report/test_html_report.py needs /usr/bin/chromium-headless-shell:" \
         "sudo apt-get install chromium-headless-shell" >&2
  fi
fi
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
.venv/bin/lint-imports --no-cache --no-logo  # the stage contracts in pyproject.toml
# Whole benchmarks (marker `bench`) are left out: `bash scripts/test.sh -m bench` runs them.
exec .venv/bin/python -m pytest -q --durations=30 -m "not bench" "$@"

#!/usr/bin/env bash
# Installs raysearch into .venv, writes the synthetic MURA-format demo data, runs the demo search
# and the ensemble. A few minutes on a 2-core laptop CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
RS=.venv/bin/raysearch
[ -d demo_data/MURA-v1.1 ] || $RS demo-data demo_data
$RS data --space search_spaces/demo.yaml   # the split the search will use
$RS tune search_spaces/demo.yaml "$@"
$RS ensemble --experiment demo --top 4

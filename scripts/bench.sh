#!/usr/bin/env bash
# Set up .venv (plus matplotlib, for the plot only), run every benchmark and write the results folder
# bench/results/<UTC date>-<device>/ (raw JSON, report.md, plot.png, env.txt). See docs/benchmarks.md.
# Arguments go to bench/run.sh (an output folder).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
python -m pip install --quiet --disable-pip-version-check matplotlib
bash bench/run.sh "$@"

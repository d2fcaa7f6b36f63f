#!/usr/bin/env bash
# Create (or reuse) ./.venv with the pinned CPU stack and fastpatch installed in editable mode.
# Sourced by scripts/test.sh and scripts/main.sh; safe to run again (pip skips what is there).
#   FASTPATCH_WITH_UPSTREAM=1  also installs the upstream DUSt3R code (test-only reference).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip_q() { python -m pip install --quiet --disable-pip-version-check "$@"; }
pip_q torch==2.13.0 triton==3.7.1
pip_q numpy pytest pytest-benchmark pytest-xdist==3.8.0
pip_q --no-deps --no-build-isolation -e .
if [ "${FASTPATCH_WITH_UPSTREAM:-0}" = "1" ]; then
    # Real upstream model code, imported by tests only (never vendored; CC BY-NC-SA).
    pip_q --no-deps mini-dust3r==0.1.2
    pip_q einops beartype huggingface_hub jaxtyping scipy pillow opencv-python-headless tqdm
fi

#!/usr/bin/env bash
# Create (or reuse) ./.venv-oldest: the oldest triton fastpatch supports, 3.1.0 (what torch 2.5 pins),
# with numpy<2 (triton <= 3.6's interpreter fails under numpy 2), pytest and fastpatch in editable mode.
# Sourced by scripts/test_oldest.sh; safe to run again (pip skips what is there).
# torch is the main environment's CPU build: PyPI has no CPU wheel of torch < 2.13 for Linux (its
# torch 2.5.1 is the CUDA build with ~3 GB of nvidia-* dependencies), and the kernels only need
# torch tensors to run under the interpreter and nothing from torch to compile.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OLDEST_TRITON=3.1.0
if [ ! -x .venv-oldest/bin/python ]; then
    python3 -m venv .venv-oldest
fi
# shellcheck disable=SC1091
. .venv-oldest/bin/activate
pip_q() { python -m pip install --quiet --disable-pip-version-check "$@"; }
pip_q torch==2.13.0 "triton==$OLDEST_TRITON" "numpy<2" pytest
pip_q --no-deps --no-build-isolation -e .

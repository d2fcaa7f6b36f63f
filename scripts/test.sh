#!/usr/bin/env bash
# Set up .venv (with the upstream reference code) and run the whole test suite on CPU;
# Triton kernels run through the interpreter, one pytest-xdist worker per CPU core, each test file
# kept on one worker (its module fixtures built once). Extra arguments go to pytest
# (e.g. `-n 0` for one process).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FASTPATCH_WITH_UPSTREAM=1 source "$root/scripts/setup_env.sh"
cd "$root"
# pytest exits 5 when it collected no test: with `set -e` that fails this script.
python -m pytest tests -q -p no:cacheprovider -n auto --dist loadfile "$@"

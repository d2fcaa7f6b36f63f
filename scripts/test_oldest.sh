#!/usr/bin/env bash
# The kernel tests under the oldest supported triton (3.1.0, in ./.venv-oldest; see setup_oldest_env.sh):
# both kernels' interpreter numerics against the float64 references, and the AOT compiles
# specialised like the runtime, for a subset of the configurations (FASTPATCH_COMPILE_CASES, a regex
# over compile case ids: head dim 64 fp16 attention and bf16 patch embedding by default, for the GPU
# classes triton 3.1's ptxas (CUDA 12.4) knows -- sm_80, sm_86, sm_90, not Blackwell's sm_100/sm_120;
# the main suite compiles every case under the newest triton). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_oldest_env.sh"
cd "$root"
export FASTPATCH_COMPILE_CASES="${FASTPATCH_COMPILE_CASES:-d64-fp16-sm(80|86|90)\$|^patch_embed[a-z_]*-sm(80|86|90)-bf16-}"
python -c "import torch, triton; print(f'oldest-triton run: triton {triton.__version__}, torch {torch.__version__}')"
# pytest exits 5 when it collected no test: with `set -e` that fails this script.
python -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
    tests/package/test_triton_versions.py \
    tests/kernels/test_patch_embed_kernels.py tests/kernels/test_rope_attention_kernels.py \
    tests/aot/test_rope_attention_aot.py tests/aot/test_patch_embed_aot.py "$@"

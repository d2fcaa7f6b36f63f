#!/usr/bin/env bash
# Set up .venv and run the main job:
#  1. a DUSt3R ViT-L/Base pair at 512x384 (random weights), eager vs patched: time, speedup, max error
#     (examples/patch_dust3r.py; extra arguments go to it);
#  2. a synthetic scene at 224x224 on the ViT-L/Base linear-head model with fastpatch modules:
#     SCENE_IMAGES images (default 4: 12 pairs, complete symmetrised graph), dust3r's inference loop vs
#     fastpatch.inference: pairs/s of each, speedup, max error (examples/scene_inference.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
python examples/patch_dust3r.py "$@"
python examples/scene_inference.py --images "${SCENE_IMAGES:-4}"

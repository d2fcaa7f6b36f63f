#!/usr/bin/env bash
# Set up .venv and run the main job: build a DUSt3R ViT-L/Base model (random weights), patch it with
# fastpatch, and print eager vs patched time, speedup and max error. Extra arguments go to the example.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
python examples/patch_dust3r.py "$@"

#!/usr/bin/env bash
# Fill wheels/ (git-ignored) with the upstream reference code the tests import, for a GPU machine with
# no network: run this once on any machine with PyPI access, then carry wheels/ along; bench/gpu_run.sh
# installs from it (scripts/install_wheels.sh) whatever that machine lacks.
#   bash scripts/fetch_wheels.sh [DIR]        default DIR: wheels
#   FASTPATCH_WHEELS_PYTHON=3.12 (default)    the GPU machine's Python (its few binary wheels are built per version)
#
# What: mini-dust3r (test-only reference, CC BY-NC-SA; never vendored) and the packages its model,
# inference and image_pairs modules import at import time, each pinned to the version the CPU tests use:
# beartype, einops, jaxtyping (+ wadler-lindig), tqdm and huggingface_hub with its own requirements
# (two of them binary: pyyaml, hf-xet; manylinux x86-64). About 9 MB.
# Not fetched: torch, numpy, torchvision (a stand-in in tests/upstream.py covers it), and the binary
# scipy, pillow and opencv-python-headless: the GPU image has all of them preinstalled, and for Python
# 3.12 they weigh 35 + 7 + 61 MB, more than the 64 MiB that may travel to the GPU machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dir="${1:-wheels}"
python_version="${FASTPATCH_WHEELS_PYTHON:-3.12}"
packages=(
    mini-dust3r==0.1.2
    beartype==0.23.1 einops==0.8.2 jaxtyping==0.3.11 wadler-lindig==0.1.8 tqdm==4.70.1
    huggingface_hub==2.4.0 click==8.5.1 filelock==4.3.1 fsspec==2026.9.0 hf-xet==1.8.0 httpx2==2.16.2
    httpcore2==2.16.2 anyio==4.16.0 idna==3.20 h11==0.16.0 truststore==0.10.5 packaging==26.4 pyyaml==6.0.4
    typing-extensions==4.16.0
)
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
mkdir -p "$dir"
rm -f "$dir"/*.whl  # one version of each package: install_wheels.sh installs every wheel it finds
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$python_version" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "${packages[@]}"
echo "$(ls "$dir"/*.whl | wc -l) wheels for Python $python_version in $dir/ ($(du -sh "$dir" | cut -f1)); carry $dir to the GPU machine"

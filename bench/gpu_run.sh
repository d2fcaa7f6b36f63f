#!/usr/bin/env bash
# One-command GPU validation on a machine with torch + triton preinstalled and no network (fits in
# 10 minutes on an H100): install fastpatch in place, run the test suite with compiled kernels on
# CUDA, run the full benchmarks (VGGT's bf16 rows at 32 and 100 frames included) and the report, all
# into bench/results/<UTC date>-<gpu>/:
#   tests.xml + tests.log (junit + pytest log), results-*.json, bench-*.log, report.md,
#   plot.png (when matplotlib is present), env.txt (nvidia-smi, versions, commit, date, step times).
# Every step has a time budget (`timeout`; 570 s in all); a step cut short keeps what it finished.
# Upstream parity tests need mini-dust3r: with no network, its wheels come from wheels/ (git-ignored,
# filled by `bash scripts/fetch_wheels.sh` on a machine with network access and carried along; override
# the folder with FASTPATCH_WHEELS); only packages this Python lacks are installed. Without it they skip.
#   bash bench/gpu_run.sh [OUT]
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//' | tr 'A-Z' 'a-z')"
out="${1:-bench/results/$(date -u +%Y-%m-%d)-${gpu:-gpu}}"
mkdir -p "$out"
status=0

start=$SECONDS
timeout 25 python -m pip install -e . --no-deps --no-build-isolation --disable-pip-version-check -q \
    >"$out/install.log" 2>&1 || status=$?
echo "install: $((SECONDS - start)) s (exit $status)"

start=$SECONDS rc=0
timeout 20 bash scripts/install_wheels.sh "${FASTPATCH_WHEELS:-wheels}" 2>&1 | tee -a "$out/install.log" || rc=$?
echo "upstream wheels: $((SECONDS - start)) s (exit $rc: 0 upstream parity tests run, else they skip)"

start=$SECONDS
# pytest-xdist (in the GPU image) spreads the test files, and so the Triton compiles, over 8 processes.
parallel=$(python -c 'import xdist' 2>/dev/null && echo "-n 8 --dist loadfile")
FASTPATCH_TEST_COMPILED=1 timeout -s INT -k 15 270 python -m pytest tests -q -p no:cacheprovider $parallel \
    --junitxml="$out/tests.xml" >"$out/tests.log" 2>&1 || status=$?
echo "tests: $((SECONDS - start)) s (exit $status); $(tail -1 "$out/tests.log")"

start=$SECONDS
FASTPATCH_BENCH_FULL=1 BENCH_FILES="attention patch_embed model vggt" \
    BENCH_TIMEOUT_ATTENTION="${BENCH_TIMEOUT_ATTENTION:-110}" BENCH_TIMEOUT_PATCH_EMBED="${BENCH_TIMEOUT_PATCH_EMBED:-25}" \
    BENCH_TIMEOUT_MODEL="${BENCH_TIMEOUT_MODEL:-80}" BENCH_TIMEOUT_VGGT="${BENCH_TIMEOUT_VGGT:-40}" \
    bash bench/run.sh "$out" || status=$?
echo "benchmarks + report: $((SECONDS - start)) s (exit $status); results in $out"
exit "$status"

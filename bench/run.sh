#!/usr/bin/env bash
# Run every benchmark file (one pytest-benchmark JSON each), then the report, into one folder:
#   bash bench/run.sh [OUT]     default OUT: bench/results/<UTC date>-<device>
# OUT gets results-<file>.json, bench-<file>.log, report.md, plot.png (with matplotlib) and env.txt.
# BENCH_FILES: which bench/test_bench_<name>.py files, in order (default "attention patch_embed model";
# bench/gpu_tune.sh runs "pair_latency"). BENCH_TIMEOUT_<NAME> (e.g. BENCH_TIMEOUT_ATTENTION): seconds per
# file (0: no limit). A file cut short is interrupted (SIGINT) so pytest still writes the JSON of what
# finished. Run inside the environment.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
device="$(python -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' \
          | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//' | tr 'A-Z' 'a-z')"
out="${1:-bench/results/$(date -u +%Y-%m-%d)-$device}"
mkdir -p "$out"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- fastpatch kernels bench || echo ' (uncommitted changes)')"
    python -c 'import sys, torch, triton; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("triton", triton.__version__); print("torch threads", torch.get_num_threads())'
    echo "FASTPATCH_BENCH_FULL=${FASTPATCH_BENCH_FULL:-0} FASTPATCH_BENCH_COMPILE=${FASTPATCH_BENCH_COMPILE:-}"
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else lscpu; fi
} >"$out/env.txt" 2>&1
status=0
jsons=()
for name in ${BENCH_FILES:-attention patch_embed model}; do
    var="BENCH_TIMEOUT_${name^^}"
    start=$SECONDS rc=0
    timeout -s INT -k 15 "${!var:-0}" python -m pytest "bench/test_bench_$name.py" --benchmark-only -q -s \
        -p no:cacheprovider --benchmark-json="$out/results-$name.json" >"$out/bench-$name.log" 2>&1 || rc=$?
    [ "$rc" -eq 0 ] || status=$rc
    echo "bench/test_bench_$name.py: $((SECONDS - start)) s (exit $rc)" | tee -a "$out/env.txt"
    [ -f "$out/results-$name.json" ] && jsons+=("$out/results-$name.json")
done
if [ "${#jsons[@]}" -gt 0 ]; then
    python -m bench.report "${jsons[@]}" --out "$out" || status=$?
else
    echo "no benchmark finished: no report" >&2
fi
exit "$status"

#!/usr/bin/env bash
# GPU tuning run (issue 11, items 3 and 4), after bench/gpu_run.sh on the same warm machine or alone on
# a fresh one (torch + triton preinstalled, no network): the launch-config sweeps of the attention and
# patch-embedding kernels, then the batch-1 pair latency with CUDA graphs, all into
# bench/results/<UTC date>-<gpu>-tune/ (or OUT):
#   sweep-attention.{json,md}, sweep-patch-embed.{json,md} (bench/sweep_*.py: every candidate checked
#   against float64, the best re-timed against the config table's entry interleaved), results-
#   pair_latency.json + bench-pair_latency.log + report.md (bench/test_bench_pair_latency.py via
#   bench/run.sh), env.txt, *.log.
# TOTAL seconds (default 240, at least 120) are split 45 / 15 / 40 % between the three steps; each step is
# a hard `timeout`, the sweeps also stop starting new steps 15 s before theirs ends, and every step keeps what
# it finished (the sweeps rewrite their JSON after each step).
#   bash bench/gpu_tune.sh [OUT] [TOTAL]
# GPU_TUNE_STEPS: which of "attention patch_embed pair" to run, in order (their shares then fill TOTAL);
# SWEEP_VARIANTS_ATTENTION (default bf16,tf32; also fp16, fp32), SWEEP_VARIANTS_PATCH_EMBED (default
# bf16; also tf32, fp32); FASTPATCH_BENCH_COMPILE=1 adds the pair bench's torch.compile rows (minutes).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//' | tr 'A-Z' 'a-z')"
out="${1:-bench/results/$(date -u +%Y-%m-%d)-${gpu:-gpu}-tune}"
total="${2:-240}"
if [ "$total" -lt 120 ]; then echo "gpu_tune.sh: TOTAL must be at least 120 s, got $total" >&2; exit 2; fi
mkdir -p "$out"
status=0

if ! python -c 'import fastpatch, os, sys; sys.exit(os.path.dirname(fastpatch.__file__) != os.path.abspath("fastpatch"))' \
        2>/dev/null; then
    timeout 25 python -m pip install -e . --no-deps --no-build-isolation --disable-pip-version-check -q \
        >"$out/install.log" 2>&1 || status=$?
fi

step() {  # step NAME LIMIT COMMAND...: run COMMAND under a hard LIMIT seconds, log in OUT/NAME.log
    local name="$1" limit="$2" start=$SECONDS rc=0
    shift 2
    timeout -s INT -k 10 "$limit" "$@" >"$out/$name.log" 2>&1 || rc=$?
    [ "$rc" -eq 0 ] || status=$rc
    echo "$name: $((SECONDS - start)) s of $limit (exit $rc)" | tee -a "$out/steps.txt"
}
# Shares of TOTAL per step (GPU_TUNE_STEPS picks and orders them; the shares of the chosen ones fill TOTAL).
declare -A share=([attention]=45 [patch_embed]=15 [pair]=40)
steps="${GPU_TUNE_STEPS:-attention patch_embed pair}"
weights=0
for name in $steps; do
    [ -n "${share[$name]:-}" ] || { echo "gpu_tune.sh: unknown step '$name' in GPU_TUNE_STEPS" >&2; exit 2; }
    weights=$(( weights + share[$name] ))
done
for name in $steps; do
    limit=$(( total * share[$name] / weights ))
    case "$name" in
        attention) step sweep-attention "$limit" python -m bench.sweep_attention --out "$out" \
            --budget-s $(( limit - 15 )) --variants "${SWEEP_VARIANTS_ATTENTION:-bf16,tf32}" ;;
        patch_embed) step sweep-patch-embed "$limit" python -m bench.sweep_patch_embed --out "$out" \
            --budget-s $(( limit - 15 )) --variants "${SWEEP_VARIANTS_PATCH_EMBED:-bf16}" ;;
        pair)
            start=$SECONDS rc=0
            BENCH_FILES=pair_latency BENCH_TIMEOUT_PAIR_LATENCY="$limit" bash bench/run.sh "$out" || rc=$?
            [ "$rc" -eq 0 ] || status=$rc
            echo "pair latency + report: $((SECONDS - start)) s of $limit (exit $rc)" | tee -a "$out/steps.txt" ;;
    esac
done
echo "results in $out (exit $status)" | tee -a "$out/steps.txt"
exit "$status"

"""Markdown report (and PNG plot) of fastpatch benchmark results.

    python -m bench.report RESULTS.json [MORE.json ...] [--out DIR]
    python bench/report.py RESULTS.json --out DIR

Reads pytest-benchmark JSON files (``pytest bench/ --benchmark-only --benchmark-json=RESULTS.json``)
and writes ``DIR/report.md`` (default: the first JSON's folder): a header with device, torch/triton
versions, commit and date, then one row per case and provider: median time, the interleaved ratios
vs eager and vs the torch path (measured side by side, interleaved, by ``bench/cases.py``: the
median of the per-round ratios), achieved TFLOP/s and % of the GPU's dense peak, peak memory, max relative error
vs eager. Rows of the scene-inference benchmark (``pairs_per_s`` in extra_info) also get a
pairs/s table with their ratio vs the upstream loop; rows that ran on a GPU add a "Targets" section
(``bench/targets.py``: issue 11's goals). ``DIR/plot.png`` shows the ratios vs eager
(skipped, with a message, without matplotlib).
Self-contained (standard library only), so both invocations work.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Dict, List, Optional

__all__ = ["PEAK_TFLOPS", "load_rows", "peak_tflops", "ratio", "markdown", "plot", "main"]

# Dense peak TFLOP/s per device-name fragment (first match wins): tensor-core bf16/fp16, TF32 tensor
# cores ("tfloat32": float32 with torch's TF32 switch on), plain fp32 FMA.
PEAK_TFLOPS = [
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "tfloat32": 378.0, "float32": 51.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "tfloat32": 495.0, "float32": 67.0}),
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "tfloat32": 495.0, "float32": 67.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "tfloat32": 156.0, "float32": 19.5}),
]
PROVIDER_ORDER = ["eager", "eager_compiled", "torch_path", "upstream_loop", "fastpatch", "fastpatch_cuda_graphs",
                  "fastpatch_compiled_graphs", "triton_in_loop", "triton_pre_rotated", "matmul_floor", "sdpa_floor"]


def peak_tflops(device: str, dtype: str) -> Optional[float]:
    """The dense peak of ``device`` (a GPU name) in ``dtype``, or None (CPU, unknown GPU)."""
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in device:
            return peaks.get(dtype)
    return None


def ratio(info: Dict, side: str, median_ms: float) -> Optional[float]:
    """How many times faster this row is than ``side`` (``eager`` / ``torch_path``), None if not measured.

    The median over rounds of (``side``'s call just before the round) / (the round) when the per-round
    times are recorded (paired: a load change between rounds cancels out), else ``side``'s median over
    this median.
    """
    partner, this = info.get(f"{side}_ms_per_round"), info.get("ms_per_round")
    if partner and this and len(partner) == len(this):
        return statistics.median(p / t for p, t in zip(partner, this))
    partner_median = info.get(f"{side}_median_ms")
    return None if partner_median is None else partner_median / median_ms


def load_rows(paths: List[str]) -> tuple:
    """(header facts, rows) from pytest-benchmark JSON files; one row per benchmark with extra_info."""
    rows, header = [], {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not header:
            commit = data.get("commit_info", {})
            facts = data.get("machine_info", {}).get("fastpatch", {})
            header = dict(facts, commit=commit.get("id", "unknown"), dirty=commit.get("dirty"),
                          date=data.get("datetime", "unknown"))
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if "case" not in info:
                continue
            median_ms = bench["stats"]["median"] * 1e3
            flops = info.get("flops")
            tflops = flops / (median_ms * 1e-3) / 1e12 if flops else None
            peak = peak_tflops(info.get("device", ""), info.get("dtype", ""))
            baseline = info.get("error_baseline", "eager")
            rows.append(dict(
                case=info["case"], provider=info["provider"], median_ms=median_ms,
                vs_eager=ratio(info, "eager", median_ms), vs_torch_path=ratio(info, "torch_path", median_ms),
                tflops=tflops, percent_peak=100.0 * tflops / peak if tflops and peak else None,
                peak_memory_mib=None if info.get("peak_memory_bytes") is None else info["peak_memory_bytes"] / 2 ** 20,
                error=info.get(f"max_rel_error_vs_{baseline}"), error_baseline=baseline, rounds=info.get("rounds"),
                pairs=info.get("pairs"), images=info.get("images"), batch=info.get("batch"),
                pairs_per_s=info.get("pairs_per_s"), vs_upstream_loop=ratio(info, "upstream_loop", median_ms),
                info=info,
            ))
    rank = {name: i for i, name in enumerate(PROVIDER_ORDER)}
    rows.sort(key=lambda r: (r["case"], rank.get(r["provider"], len(rank)), r["provider"]))
    return header, rows


def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def markdown(header: Dict, rows: List[Dict]) -> str:
    """The report: header lines and the results table."""
    dirty = " (uncommitted changes)" if header.get("dirty") else ""
    lines = [
        "# fastpatch benchmarks", "",
        f"- device: {header.get('device', 'unknown')} ({header.get('processor', '')}, "
        f"{header.get('cpu_threads', '?')} torch threads)",
        f"- torch {header.get('torch', '?')}, triton {header.get('triton', '?')}, CUDA {header.get('cuda')}",
        f"- commit: {header.get('commit')}{dirty}",
        f"- date: {header.get('date')}",
        f"- matrix: {'full (FASTPATCH_BENCH_FULL=1)' if header.get('full') else 'default'}", "",
        "Ratios: median over rounds of (the other side's call just before the round) / (the round), measured "
        "interleaved in the same test (> 1: this row is faster). `torch_path` is measured on CUDA only (on CPU it is what `fastpatch` runs). "
        "Error: max |x - eager| / max |eager| over all outputs. FLOPs: spec §11 (fwd+bwd: 3x linear, 3.5x attention).",
        "",
        "| case | provider | median ms | x vs eager | x vs torch path | TFLOP/s | % peak | peak mem MiB | max rel err | rounds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['provider']} | {r['median_ms']:.3f} | {_fmt(r['vs_eager'], '.2f')} | "
            f"{_fmt(r['vs_torch_path'], '.2f')} | {_fmt(r['tflops'], '.3f')} | {_fmt(r['percent_peak'], '.1f')} | "
            f"{_fmt(r['peak_memory_mib'], '.1f')} | {_error(r)} | {r['rounds'] or ''} |")
    return "\n".join(lines + _pair_lines(rows)) + "\n"


def _error(row: Dict) -> str:
    """The error cell; names the baseline when it is not eager."""
    cell = _fmt(row["error"], ".1e")
    return f"{cell} (vs {row['error_baseline']})" if cell and row["error_baseline"] != "eager" else cell


def _pair_lines(rows: List[Dict]) -> List[str]:
    """The scene-inference table (rows with ``pairs_per_s``, from bench/test_bench_pairs.py), or nothing."""
    scene_rows = [r for r in rows if r["pairs_per_s"] is not None]
    if not scene_rows:
        return []
    lines = [
        "", "## Scene inference (pairs/s)", "",
        "`eager`: the unpatched model in dust3r's inference loop; `upstream_loop`: the same model with fastpatch "
        "modules in the same loop and batches; `fastpatch`: `fastpatch.inference` on the patched model. Ratios are "
        "paired per round as above; each row's error is against the side named.", "",
        "| case | provider | images | pairs | batch size | pairs/s | x vs upstream loop | x vs eager | max rel err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in scene_rows:
        lines.append(
            f"| {r['case']} | {r['provider']} | {r['images']} | {r['pairs']} | {r['batch']} | {r['pairs_per_s']:.3f} | "
            f"{_fmt(r['vs_upstream_loop'], '.2f')} | {_fmt(r['vs_eager'], '.2f')} | "
            f"{_fmt(r['error'], '.1e')} (vs {r['error_baseline']}) |")
    return lines


def plot(rows: List[Dict], path: str) -> bool:
    """Bar chart of the ratio vs eager of every non-eager row; False (with a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (bash scripts/bench.sh installs it)", file=sys.stderr)
        return False
    shown = [r for r in rows if r["provider"] != "eager" and r["vs_eager"]]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(shown) + 1.5))
    labels = [f"{r['case']} [{r['provider']}]" for r in shown]
    ax.barh(range(len(shown)), [r["vs_eager"] for r in shown], color="tab:blue")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(shown)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup vs eager (median of interleaved per-round ratios)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _targets_section(rows: List[Dict], paths: List[str]) -> str:
    """bench/targets.py's "Targets" section (issue 11's goals) when a row ran on a GPU, else ""."""
    if __package__:
        from . import targets
    else:  # python bench/report.py
        import targets
    return targets.section(rows, paths)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON file(s)")
    parser.add_argument("--out", help="output folder (default: the first JSON's folder)")
    args = parser.parse_args(argv)
    out = args.out or os.path.dirname(os.path.abspath(args.results[0]))
    os.makedirs(out, exist_ok=True)
    header, rows = load_rows(args.results)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(header, rows) + _targets_section(rows, args.results))
    plotted = plot(rows, os.path.join(out, "plot.png"))
    print(f"wrote {os.path.join(out, 'report.md')}{' and plot.png' if plotted else ''} ({len(rows)} rows)")


if __name__ == "__main__":
    main()

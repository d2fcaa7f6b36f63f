"""bench/report.py on a tiny synthetic pytest-benchmark JSON: table rows, ratios, TFLOP/s, % of peak."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench(case, provider, median_s, eager_ms, torch_ms=None, device="NVIDIA H100 80GB HBM3", memory=None):
    return {"stats": {"median": median_s}, "extra_info": {
        "case": case, "provider": provider, "device": device, "dtype": "bfloat16", "flops": 1e12,
        "eager_median_ms": eager_ms, "torch_path_median_ms": torch_ms, "max_rel_error_vs_eager": 2e-3,
        "peak_memory_bytes": memory, "rounds": 5}}


def _report(tmp_path, benchmarks) -> list:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({
        "datetime": "2026-01-02T03:04:05", "commit_info": {"id": "abc123", "dirty": False},
        "machine_info": {"fastpatch": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "triton": "3.6"}},
        "benchmarks": benchmarks}))
    subprocess.run([sys.executable, "-m", "bench.report", str(results), "--out", str(tmp_path / "out")],
                   cwd=ROOT, check=True, capture_output=True)
    return (tmp_path / "out" / "report.md").read_text().splitlines()


def _row(lines, case, provider):
    [row] = [line for line in lines if line.startswith(f"| {case} | {provider} |")]
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_report_ratios_throughput_and_header(tmp_path):
    lines = _report(tmp_path, [
        _bench("attn", "fastpatch", 0.002, eager_ms=8.0, torch_ms=3.0, memory=3 * 2 ** 20),
        _bench("attn", "eager", 0.0079, eager_ms=7.9),
        _bench("attn", "torch_path", 0.003, eager_ms=9.0),
    ])
    assert any("abc123" in line for line in lines) and any("2026-01-02" in line for line in lines)
    assert any("torch 2.11, triton 3.6" in line for line in lines)
    fast = _row(lines, "attn", "fastpatch")
    # median ms, x vs eager (8 / 2), x vs torch path (3 / 2), TFLOP/s (1e12 / 2 ms), % of 989, MiB, error
    assert fast[2:9] == ["2.000", "4.00", "1.50", "500.000", f"{100 * 500 / 989:.1f}", "3.0", "2.0e-03"]
    assert _row(lines, "attn", "eager")[3] == "1.00"
    assert _row(lines, "attn", "torch_path")[3:5] == ["3.00", ""]
    providers = [line.split("|")[2].strip() for line in lines if line.startswith("| attn |")]
    assert providers == ["eager", "torch_path", "fastpatch"]


def test_report_pairs_per_round_ratios(tmp_path):
    bench = _bench("enc", "fastpatch", 2.0, eager_ms=99.0, device="cpu")
    # rounds of 1, 2, 4 s; the eager call before each: 3, 2, 8 s -> paired ratios 3, 1, 2 -> median 2
    bench["extra_info"].update(ms_per_round=[1000.0, 2000.0, 4000.0], eager_ms_per_round=[3000.0, 2000.0, 8000.0])
    assert _row(_report(tmp_path, [bench]), "enc", "fastpatch")[3] == "2.00"


def test_report_cpu_leaves_percent_of_peak_empty(tmp_path):
    lines = _report(tmp_path, [_bench("enc", "fastpatch", 2.0, eager_ms=3000.0, device="cpu")])
    row = _row(lines, "enc", "fastpatch")
    assert row[3] == "1.50" and row[5] == "0.500" and row[6] == "" and row[7] == ""

"""bench/targets.py on synthetic pytest-benchmark JSON (built like test_report.py's): issue 11's targets
met / missed / not measured, % of dense peak, the no-host-sync line from tests.xml, GPU-only section."""
import glob
import os
import subprocess
import sys

import pytest

from test_report import ROOT, _bench, _report

ATTENTION = "rope_attention-{}-n768-b8-{}-cuda"
ENCODER = "encoder-forward-384x512-b8-bfloat16-cuda"
PAIR = "pair-forward-384x512-b1-bfloat16-cuda"
PATCH_EMBED = "patch_embed-forward-384x512-b8-bfloat16-cuda"
H100_BF16_PEAK, H100_TF32_PEAK = 989.0, 495.0  # bench/report.py PEAK_TFLOPS, "NVIDIA H100 80GB HBM3"


def _partners(bench, **medians_ms):
    """Adds ``<partner>_median_ms`` fields (what bench/cases.py measure() records for extra partners)."""
    bench["extra_info"].update({f"{name}_median_ms": ms for name, ms in medians_ms.items()})
    return bench


def _targets(tmp_path, benchmarks, tests_xml=None) -> list:
    """report.md's lines (via test_report's _report) and the `python -m bench.targets` output on the same JSON."""
    if tests_xml is not None:
        (tmp_path / "tests.xml").write_text(tests_xml)
    report = _report(tmp_path, benchmarks)
    run = subprocess.run([sys.executable, "-m", "bench.targets", str(tmp_path / "results.json")], cwd=ROOT,
                         check=True, capture_output=True, text=True)
    return report, run.stdout.splitlines()


def _line(lines, what, against=""):
    [line] = [line for line in lines if line.startswith(f"| {what} | {against}")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_attention_targets_met_missed_and_missing_baseline(tmp_path):
    forward, backward, fp32 = (ATTENTION.format(*key) for key in
                               (("forward", "bfloat16"), ("forward_backward", "bfloat16"), ("forward", "float32")))
    report, lines = _targets(tmp_path, [
        # forward: 2 ms; torch_path 3 ms (1.5x), flash 2.8 (1.4x), cuDNN 2.7 (1.35x): the fastest baseline counts
        _partners(_bench(forward, "fastpatch", 0.002, eager_ms=20.0, torch_ms=3.0), sdpa_flash=2.8, sdpa_cudnn=2.7),
        *(_bench(forward, name, 0.003, eager_ms=20.0) for name in ("eager", "torch_path", "sdpa_flash", "sdpa_cudnn")),
        # forward + backward: 1.2x the torch path, goal 1.3x
        _bench(backward, "fastpatch", 0.002, eager_ms=20.0, torch_ms=2.4),
        _bench(backward, "torch_path", 0.0024, eager_ms=20.0),
        # TF32: fastpatch_tf32 timed against eager_tf32, but eager_tf32's own row is missing
        _partners(_bench(fp32, "fastpatch_tf32", 0.002, eager_ms=None), eager_tf32=20.0),
    ])
    row = _line(lines, "rope_attention fwd, B=8 H=16 N=768 Dh=64 bf16")
    # target, against, goal, measured, TFLOP/s (1e12 FLOP / 2 ms), % of the H100's bf16 dense peak, status
    assert row[2:] == [">= 1.3x", "1.35x: `fastpatch` vs `sdpa_cudnn`, the fastest of 3", "500.0",
                       f"{100 * 500 / H100_BF16_PEAK:.1f}", "met"]
    assert _line(lines, "rope_attention fwd+bwd, same shape")[3:] == [
        "1.20x: `fastpatch` vs `torch_path`", "500.0", f"{100 * 500 / H100_BF16_PEAK:.1f}", "missed (1.20x < 1.3x)"]
    tf32 = _line(lines, "rope_attention fwd, same shape, fp32 with TF32 allowed")
    assert tf32[3:] == ["", "", "", f"not measured: no row of `{fp32}` for `eager_tf32`"]
    assert any(line.startswith("- device: NVIDIA H100 80GB HBM3") for line in lines)
    assert any("abc123" in line for line in lines) and any("torch 2.11, triton 3.6" in line for line in lines)
    # report.md gets the same table in its Targets section
    assert "## Targets (issue 11)" in report and _line(report, "rope_attention fwd+bwd, same shape")[-1].startswith(
        "missed")


def test_missing_baseline_row_shows_the_partial_figure_but_is_not_measured(tmp_path):
    """sdpa_cudnn skipped (it cannot run here): the ratio against the other two is shown, never called met."""
    forward = ATTENTION.format("forward", "bfloat16")
    _, lines = _targets(tmp_path, [
        _partners(_bench(forward, "fastpatch", 0.002, eager_ms=20.0, torch_ms=3.0), sdpa_flash=2.8),
        *(_bench(forward, name, 0.003, eager_ms=20.0) for name in ("eager", "torch_path", "sdpa_flash"))])
    assert _line(lines, "rope_attention fwd, B=8 H=16 N=768 Dh=64 bf16")[3:] == [
        "1.40x: `fastpatch` vs `sdpa_flash`, the fastest of 2 measured", "500.0", f"{100 * 500 / H100_BF16_PEAK:.1f}",
        f"not measured: no row of `{forward}` for `sdpa_cudnn`"]


def test_tf32_row_percent_of_tf32_peak(tmp_path):
    fp32 = ATTENTION.format("forward", "float32")
    fast = _partners(_bench(fp32, "fastpatch_tf32", 0.002, eager_ms=None), eager_tf32=12.0)
    fast["extra_info"]["dtype"] = "tfloat32"
    _, lines = _targets(tmp_path, [fast, _bench(fp32, "eager_tf32", 0.012, eager_ms=11.0)])
    assert _line(lines, "rope_attention fwd, same shape, fp32 with TF32 allowed")[3:] == [
        "6.00x: `fastpatch_tf32` vs `eager_tf32`", "500.0", f"{100 * 500 / H100_TF32_PEAK:.1f}", "met"]


@pytest.mark.parametrize("flops,status", [(1e12, f"missed ({100 * 500 / H100_BF16_PEAK:.1f}% < 55% of dense peak)"),
                                          (1.2e12, "met")])
def test_encoder_compile_target_needs_ratio_and_percent_of_peak(tmp_path, flops, status):
    fast = _bench(ENCODER, "fastpatch", 0.002, eager_ms=6.0)  # 3.0x eager
    fast["extra_info"]["flops"] = flops
    _, lines = _targets(tmp_path, [fast, _bench(ENCODER, "eager", 0.006, eager_ms=6.0),
                                   _bench(ENCODER, "eager_compiled", 0.0024, eager_ms=6.0)])  # 2.5x eager
    assert _line(lines, "ViT-L encoder, 512x384, batch 8, bf16", "eager |")[3] == "3.00x: `fastpatch` vs `eager`"
    assert _line(lines, "ViT-L encoder, 512x384, batch 8, bf16", "eager |")[-1] == "met"
    compiled = _line(lines, "ViT-L encoder, 512x384, batch 8, bf16", "torch.compile")
    # no test times fastpatch with eager_compiled: 3.0 / 2.5 via eager
    assert compiled[2:4] == [">= 1.15x and >= 55% of dense peak", "1.20x: `fastpatch` vs `eager_compiled`, via eager"]
    assert compiled[-1] == status


def test_encoder_compile_target_without_compiled_row_is_not_measured(tmp_path):
    _, lines = _targets(tmp_path, [_bench(ENCODER, "fastpatch", 0.002, eager_ms=6.0),
                                   _bench(ENCODER, "eager", 0.006, eager_ms=6.0)])
    compiled = _line(lines, "ViT-L encoder, 512x384, batch 8, bf16", "torch.compile")
    assert compiled[3:] == ["", "", "", f"not measured: no row of `{ENCODER}` for `eager_compiled`"]


@pytest.mark.parametrize("graphs_eager_ms,compiled_eager_ms,expected", [
    (None, None, ["1.90x: `fastpatch` vs `eager`, best of 2 rows", f"not measured: no row of `{PAIR}` for "
                  "`fastpatch_cuda_graphs` (the others miss: 1.90x < 2x)"]),
    (3.8, None, ["1.90x: `fastpatch` vs `eager`, best of 2 rows",
                 "missed (1.90x < 2x; `fastpatch_compiled_graphs` not run)"]),
    (3.8, 3.7, ["1.90x: `fastpatch` vs `eager`, best of 2 rows", "missed (1.90x < 2x)"]),
    (4.4, None, ["2.20x: `fastpatch_cuda_graphs` vs `eager`", "met"]),
    (3.8, 4.2, ["2.10x: `fastpatch_compiled_graphs` vs `eager`", "met"]),
])
def test_pair_target_takes_the_best_fastpatch_provider(tmp_path, graphs_eager_ms, compiled_eager_ms, expected):
    rows = [_bench(PAIR, "eager", 0.0036, eager_ms=3.6),
            _bench(PAIR, "fastpatch", 0.002, eager_ms=3.6),  # bench/test_bench_model.py: 1.8x
            _bench(PAIR, "fastpatch", 0.002, eager_ms=3.8)]  # bench/test_bench_pair_latency.py: 1.9x
    if graphs_eager_ms is not None:
        rows.append(_bench(PAIR, "fastpatch_cuda_graphs", 0.002, eager_ms=graphs_eager_ms))
    if compiled_eager_ms is not None:  # opt-in (FASTPATCH_BENCH_COMPILE=1)
        rows.append(_bench(PAIR, "fastpatch_compiled_graphs", 0.002, eager_ms=compiled_eager_ms))
    _, lines = _targets(tmp_path, rows)
    row = _line(lines, "full pair forward, batch 1, bf16 (CUDA graphs allowed)")
    assert [row[3], row[-1]] == expected


def test_never_met_without_a_paired_timing(tmp_path):
    """Both rows present, but the fastpatch row holds no timing of eager: not measured, not met."""
    _, lines = _targets(tmp_path, [_bench(PATCH_EMBED, "fastpatch", 0.0001, eager_ms=None),
                                   _bench(PATCH_EMBED, "eager", 0.001, eager_ms=1.0)])
    assert _line(lines, "patch embedding, 512x384, batch 8, bf16")[3:] == [
        "", "", "", "not measured: no paired timing of `fastpatch` against `eager`"]


def _junit(**results) -> str:
    """A junit file: test name -> "" (passed), "failure" or "skipped" for the two no-host-sync tests' cases."""
    cases = []
    for name, result in results.items():
        module, function = name.split("__")
        body = {"": "", "failure": '<failure message="sync"/>', "skipped": '<skipped message="needs CUDA"/>'}[result]
        cases.append(f'<testcase classname="tests.{module}" name="{function}" time="0.1">{body}</testcase>')
    return f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>'


SYNC_CASES = ("test_patch_embed_devices__test_no_device_synchronisation[cpu]",
              "test_patch_embed_devices__test_no_device_synchronisation[image device]",
              "test_cuda_sync__test_patched_forward_and_backward_do_not_sync[PatchEmbedDust3R]")


@pytest.mark.parametrize("results,status", [
    (None, "not measured: no tests.xml beside the results"),
    (dict.fromkeys(SYNC_CASES, ""), "met"),
    ({**dict.fromkeys(SYNC_CASES, ""), SYNC_CASES[1]: "failure"}, "missed (a test failed)"),
    ({**dict.fromkeys(SYNC_CASES, ""), SYNC_CASES[2]: "skipped"}, "not measured: skipped: needs CUDA"),
    (dict.fromkeys(SYNC_CASES[:2], ""), "not measured: not run"),
])
def test_no_host_sync_line_reads_tests_xml(tmp_path, results, status):
    rows = [_bench(PATCH_EMBED, "fastpatch", 0.0001, eager_ms=1.0), _bench(PATCH_EMBED, "eager", 0.001, eager_ms=1.0)]
    _, lines = _targets(tmp_path, rows, tests_xml=None if results is None else _junit(**results))
    row = _line(lines, "patch embedding: no host sync")
    assert row[-1] == status
    if results is None:
        assert row[3] == ("see `tests/ops/test_patch_embed_devices.py::test_no_device_synchronisation`, "
                          "`tests/ops/test_cuda_sync.py::test_patched_forward_and_backward_do_not_sync`")
    elif status == "met":
        assert row[3] == ("`tests/ops/test_patch_embed_devices.py::test_no_device_synchronisation`: 2 passed; "
                          "`tests/ops/test_cuda_sync.py::test_patched_forward_and_backward_do_not_sync`: 1 passed")
    assert _line(lines, "patch embedding, 512x384, batch 8, bf16")[-1] == "met"  # 10x


def test_cpu_only_results_have_no_targets_section(tmp_path):
    report, lines = _targets(tmp_path, [_bench("rope_attention-forward-n768-b1-float32-cpu", "fastpatch", 0.01,
                                               eager_ms=30.0, device="cpu")])
    assert not any("Targets" in line for line in report) and not any(line.startswith("|") for line in lines)
    assert "not applicable" in lines[0]


def test_committed_cpu_results_are_not_applicable():
    paths = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "*cpu*", "results-*.json")))
    assert paths
    run = subprocess.run([sys.executable, "-m", "bench.targets", *paths], cwd=ROOT, check=True, capture_output=True,
                         text=True)
    assert run.stdout.startswith("No GPU rows in ") and "not applicable" in run.stdout


def test_rows_of_two_gpus_are_refused(tmp_path):
    _report(tmp_path, [_bench(PAIR, "eager", 0.0036, eager_ms=3.6),
                       _bench(PAIR, "fastpatch", 0.002, eager_ms=3.6, device="NVIDIA A100-SXM4-80GB")])
    run = subprocess.run([sys.executable, "-m", "bench.targets", str(tmp_path / "results.json")], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "rows from several GPUs" in run.stderr

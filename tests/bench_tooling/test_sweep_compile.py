"""bench/sweep_compile.py: the static pass over the sweeps' candidates (compiled for sm_90 on the CPU)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from bench import sweep_compile
from modes import cpu_ci_only

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_resident_programs_follow_registers_shared_memory_and_warps():
    # 144 registers x 128 threads = 18.4k of 64k registers: 3 programs; 42 KB of shared memory would allow 5
    assert sweep_compile.resident_programs(144, 41984, 4, 90) == 3
    # 255 registers are allocated as 256 per thread: 8 warps take the whole register file
    assert sweep_compile.resident_programs(255, 1024, 8, 90) == 1
    # shared memory bound: 100 KB per program on Hopper's 228 KB
    assert sweep_compile.resident_programs(32, 100 * 1024, 4, 90) == 2
    # warps bound: 64 warps per SM
    assert sweep_compile.resident_programs(16, 0, 16, 90) == 4


def test_refuses_to_run_under_the_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        sweep_compile.run(str(tmp_path), 90, 1, selected=[])


def test_every_candidate_of_both_sweeps_is_listed_once_with_the_table_entries_marked():
    jobs = sweep_compile.jobs(90)
    keys = [(kind, variant, step, json.dumps(config, sort_keys=True)) for kind, variant, step, config, _ in jobs]
    assert len(keys) == len(set(keys))
    tables = {(kind, variant, step) for kind, variant, step, _, table in jobs if table}
    assert tables == {("attention", v, s) for v in ("bf16", "fp16", "tf32", "fp32")
                      for s in ("forward", "backward_dq", "backward_dkdv")} | {
        ("patch_embed", v, "forward") for v in ("bf16", "tf32", "fp32")}


@cpu_ci_only
def test_table_entries_compile_for_hopper_with_their_resources(tmp_path):
    """The bf16 attention forward and patch-embedding table entries, compiled in a subprocess without the
    interpreter: wgmma, registers, no spills, at least one program per SM, and a markdown table."""
    script = textwrap.dedent(f"""
        from bench import sweep_compile
        selected = [job for job in sweep_compile.jobs(90)
                    if job[4] and job[1] == "bf16" and job[2] == "forward"]
        document = sweep_compile.run({str(tmp_path)!r}, 90, 1, selected)
        with open({str(tmp_path / "sweep-compile.md")!r}, "w") as f:
            f.write(sweep_compile.markdown(document))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True, timeout=600,
                   capture_output=True)
    rows = json.loads((tmp_path / "sweep-compile.json").read_text())["rows"]
    assert [(r["kind"], r["table"]) for r in rows] == [("attention", True), ("patch_embed", True)]
    for row in rows:
        assert "error" not in row, row
        assert row["wgmma"] and row["registers"] > 0 and row["stack"] == 0 and row["programs_per_sm"] >= 1, row
    report = (tmp_path / "sweep-compile.md").read_text()
    assert "## attention forward bf16: 1 candidates, 0 spill, 0 do not compile" in report and "(table)" in report

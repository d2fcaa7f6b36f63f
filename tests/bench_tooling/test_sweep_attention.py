"""bench/sweep_attention.py and the launchers' ``override_config`` it relies on.

The sweep runs at a tiny shape (1 batch, 2 heads, 32 tokens) in float32, one extra candidate per
kernel (``quick``): every step must produce ranked rows checked against the float64 reference,
and a candidate whose numbers are wrong must be reported and never chosen.
"""
import dataclasses
import json

import pytest
import torch

from bench import sweep_attention
from fastpatch.kernels.rope_attention_configs import KernelConfig, rope_attention_config
from fastpatch.launchers import rope_attention as launchers
from fastpatch.testing import TOLERANCES
from fastpatch_dev.aot import recorded_launches

TINY = {"tiny": (1, 2, 32)}


def _forward_launch(device, dtype=torch.float32):
    q = torch.empty(1, 2, 32, 64, dtype=dtype, device=device)
    pos = torch.zeros(1, 32, 2, dtype=torch.int64, device=device)
    with recorded_launches([launchers.rope_attention_fwd_kernel]) as launches:
        launchers.rope_attention_forward(q, q, q, pos, pos, 100.0, 1.0, 0.125, k_rotation="in_loop")
    [(_, arguments, options)] = launches
    return arguments["BLOCK_M"], arguments["BLOCK_N"], options["num_warps"], options["num_stages"]


def test_override_config_launches_the_given_config_and_restores_the_table():
    device = torch.device("cpu")
    table = rope_attention_config(64, torch.float32, None, "ieee")
    custom = dataclasses.replace(table, forward=KernelConfig(block_m=16, block_n=128, num_warps=2, num_stages=3))
    before = _forward_launch(device)
    with launchers.override_config(custom, device, torch.float32, 64, "ieee"):
        assert _forward_launch(device) == (16, 128, 2, 3)
    assert _forward_launch(device) == before == (table.forward.block_m, table.forward.block_n,
                                                  table.forward.num_warps, table.forward.num_stages)


@pytest.mark.parametrize("forward,k_rotation,message", [
    (KernelConfig(48, 64, 4, 1), "in_loop", "power of two"),
    (KernelConfig(8, 64, 4, 1), "in_loop", "power of two"),
    (KernelConfig(64, 64, 3, 1), "in_loop", "num_warps"),
    (KernelConfig(64, 64, 4, 0), "in_loop", "num_stages"),
    (KernelConfig(64, 64, 4, 1), "sideways", "k_rotation"),
])
def test_override_config_rejects_bad_configs(forward, k_rotation, message):
    table = rope_attention_config(64, torch.float32, None, "ieee")
    bad = dataclasses.replace(table, forward=forward, k_rotation=k_rotation)
    with pytest.raises(ValueError, match=message):
        with launchers.override_config(bad, torch.device("cpu"), torch.float32, 64, "ieee"):
            pass


def test_sweep_ranks_checked_candidates_and_never_picks_a_wrong_one(tmp_path, device, monkeypatch):
    """The forward candidate with 32-row query blocks is made to return wrong numbers: it must be
    flagged ``wrong`` and the sweep must keep another forward config."""
    real_forward = sweep_attention.rope_attention_forward

    def forward_wrong_at_block_m_32(q, *args, **kwargs):
        out, lse = real_forward(q, *args, **kwargs)
        if launchers.launch_plan(q.device, q.dtype, q.shape[-1], "ieee").config.forward.block_m == 32:
            out = out * 1.01
        return out, lse

    monkeypatch.setattr(sweep_attention, "rope_attention_forward", forward_wrong_at_block_m_32)
    document = sweep_attention.run(str(tmp_path), ["fp32"], TINY, device, quick=True, log=lambda line: None)

    rows = document["rows"]
    assert [r["step"] for r in rows] == [s for s in sweep_attention.STEPS for _ in range(2)]
    forward_rows = [r for r in rows if r["step"] == "forward"]
    wrong = [r for r in forward_rows if r["config"]["forward"]["block_m"] == 32]
    assert len(wrong) == 1 and wrong[0]["status"].startswith("wrong")
    chosen = document["chosen"]["fp32"]
    assert chosen["forward"]["block_m"] != 32
    for row in rows:
        if row is not wrong[0]:
            assert row["status"] == "ok", row
            assert max(row["error"].values()) <= TOLERANCES[torch.float32].backward
            assert row["ms"]["tiny"] > 0 and row["tflops"]["tiny"] > 0
    assert {c["step"] for c in document["comparisons"]} == set(sweep_attention.STEPS)
    assert json.loads((tmp_path / "sweep-attention.json").read_text())["chosen"] == document["chosen"]

    report = sweep_attention.markdown(document)
    for step in sweep_attention.STEPS:
        assert f"## fp32 {step}" in report
    assert "(table)" in report and "1 candidate(s) not ranked: M32 N32 w4 s1: wrong" in report


def test_budget_skips_steps_and_says_so(tmp_path, device):
    document = sweep_attention.run(str(tmp_path), ["fp32"], TINY, device, budget_s=0.0, quick=True,
                                   log=lambda line: None)
    assert document["rows"] == [] and document["skipped"] == [f"fp32 {s}" for s in sweep_attention.STEPS]
    assert document["chosen"] == {}  # nothing measured, nothing chosen
    assert "not run (budget spent or interrupted): fp32 forward" in sweep_attention.markdown(document)


def test_candidates_start_with_the_table_entry_and_have_no_duplicates():
    table = rope_attention_config(64, torch.bfloat16, (9, 0), "ieee")
    for kernel in ("forward", "backward_dq", "backward_dkdv"):
        options = sweep_attention.candidates("bf16", kernel, table)
        assert options[0] == getattr(table, kernel)
        assert len(options) == len(set(options)) > 8


def test_precompile_workers_run_every_job_and_report_failures():
    """Two spawned workers (the interpreter here, inherited TRITON_INTERPRET): good jobs pass, a config
    the launcher rejects comes back as a failure keyed by its job."""
    table = rope_attention_config(64, torch.float32, None, "ieee")
    good = dataclasses.asdict(table)
    bad = dataclasses.asdict(dataclasses.replace(table, forward=KernelConfig(48, 32, 4, 1)))
    jobs = [("fp32", "forward", good, (1, 2, 32)), ("fp32", "forward", bad, (1, 2, 32))]
    with sweep_attention.compile_pool(2) as pool:
        failures = sweep_attention.precompile(pool, sweep_attention._compile_worker, jobs, workers=2)
    assert len(failures) == 1
    [(job, message)] = failures.items()
    assert "48" in job and "ValueError" in message and "power of two" in message


def test_command_line_writes_json_and_markdown(tmp_path):
    out = tmp_path / "sweep"
    assert sweep_attention.main(["--out", str(out), "--quick", "--shape", "tiny=1,2,32", "--variants", "fp32",
                                 "--workers", "0"]) == 0
    document = json.loads((out / "sweep-attention.json").read_text())
    assert document["shapes"] == {"tiny": [1, 2, 32]} and "fp32" in document["chosen"]
    assert (out / "sweep-attention.md").read_text().startswith("# RoPE attention launch-config sweep")


@pytest.mark.parametrize("argv,message", [
    (["--variants", "fp64"], "unknown variants"),
    (["--shape", "tiny=1,2"], "expected NAME=B,H,N"),
])
def test_command_line_rejects_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        sweep_attention.main(["--out", str(tmp_path)] + argv)
    assert message in capsys.readouterr().err


def test_interrupted_sweep_reports_its_last_json_write(tmp_path):
    """``timeout -s INT`` lands as KeyboardInterrupt: the report comes from the last JSON write, exit 130."""
    def interrupted_run(out, variants, shapes, device, budget_s, workers, quick):
        document = {"environment": {"device": "cpu", "capability": None, "torch": "t", "triton": "t", "cuda": None,
                                    "commit": "c", "dirty": False, "date": "d"},
                    "shapes": shapes, "head_dim": 64, "rows": [], "comparisons": [], "chosen": {}, "skipped": [],
                    "precompile": {}}
        sweep_attention.write_json(str(tmp_path / "sweep-attention.json"), document)
        raise KeyboardInterrupt

    status = sweep_attention.sweep.main(["--out", str(tmp_path)], "test", ["fp32"], {"tiny": (1, 2, 32)}, "B,H,N",
                                        interrupted_run, sweep_attention.markdown, "sweep-attention.md")
    assert status == 130
    report = (tmp_path / "sweep-attention.md").read_text()
    assert "not run (budget spent or interrupted): the rest (interrupted)" in report

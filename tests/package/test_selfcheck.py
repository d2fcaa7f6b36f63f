"""``python -m fastpatch``, the self-check (fastpatch/selfcheck.py).

* As users run it, in a subprocess: on a CPU machine (no interpreter) it prints versions, devices and
  the backend per op and device, runs no kernel check, and exits 0; with triton hidden it says why.
* In this process, where the kernels run (``device``: the interpreter on CPU, or CUDA in compiled
  mode), every kernel check passes; wrong numbers or a kernel that raises make it exit 1.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastpatch.selfcheck as selfcheck
from fastpatch.backend import refresh_environment, requested_backend

ROOT = Path(__file__).resolve().parents[2]
KERNEL_CHECKS = ["rope_attention forward", "rope_attention backward", "patch_embed forward", "patch_embed backward",
                 "patch_embed ManyAR forward", "patch_embed ManyAR backward", "qknorm_rope_attention forward",
                 "qknorm_rope_attention backward"]
KERNEL_GROUPS = ("rope_attention", "patch_embed", "patch_embed ManyAR", "qknorm_rope_attention")
RESULT_LINE = re.compile(r"^  (.+?)\s+(float16|bfloat16|float32)\s+max rel err\s+(\S+) \(tol (\S+)\)  (PASS|FAIL)")


def _run(code: str = "import runpy; runpy.run_module('fastpatch', run_name='__main__')", **env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTPATCH_BACKEND")}
    env.update(env_vars)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _results(output: str):
    return [m.groups() for m in map(RESULT_LINE.match, output.splitlines()) if m]


def test_python_m_fastpatch_on_cpu_prints_versions_backends_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "fastpatch"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTPATCH_BACKEND")})
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    import triton

    for fact in (f"torch {torch.__version__}", f"triton {triton.__version__}", "fastpatch 0.1.0", "TRITON_INTERPRET",
                 "devices:\n  cpu\n"):
        assert fact in out, (fact, out)
    for op in ("rope_attention", "patch_embed", "qknorm_rope_attention"):
        assert re.search(rf"^  cpu +{op} +torch +CPU tensors run the torch path", out, re.M), out
    if torch.cuda.is_available():  # a GPU machine: every kernel checked on CUDA
        assert len(_results(out)) == 24 and all(r[-1] == "PASS" for r in _results(out)), out
    else:
        assert "kernel checks: none" in out and _results(out) == []
    assert out.rstrip().endswith("result: PASS")


def test_without_triton_it_says_why():
    hide = ("import sys\n"
            "class NoTriton:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'triton':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NoTriton())\n"
            "import runpy; runpy.run_module('fastpatch', run_name='__main__')\n")
    proc = _run(hide, TRITON_INTERPRET="1")  # the interpreter is asked for, but there is no triton
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "triton not importable (ModuleNotFoundError: No module named 'triton')" in out, out
    for device in ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else []):
        assert re.search(rf"^  {device} +rope_attention +torch +triton cannot be imported \(ModuleNotFoundError", out,
                         re.M), out
    assert "kernel checks: none" in out and out.rstrip().endswith("result: PASS")


def test_a_backend_that_cannot_be_used_exits_1(monkeypatch, capsys):
    monkeypatch.setenv("FASTPATCH_BACKEND", "fastest")
    refresh_environment()  # fastpatch reads the environment at import
    try:
        assert selfcheck.main([]) == 1
    finally:
        monkeypatch.undo()
        refresh_environment()
    out = capsys.readouterr().out
    assert re.search(r"^  cpu +patch_embed +error +FASTPATCH_BACKEND='fastest' is not a fastpatch backend", out, re.M)
    assert re.search(r"result: FAIL \(\d+ failed\)$", out.rstrip())


def _kernel_results(out: str, device: torch.device):
    header = re.search(rf"^kernel checks on {device.type}\S* ", out, re.M)
    assert header, out
    return _results(out[header.start():])


def test_every_kernel_passes_where_the_kernels_run(device, capsys):
    # The device fixture's device runs the kernels: the interpreter on CPU (conftest), or CUDA in compiled mode.
    assert selfcheck.main([]) == 0
    out = capsys.readouterr().out
    results = _kernel_results(out, device)
    assert [(name.split(" (")[0], dtype) for name, dtype, *_ in results] == [
        (name, dtype) for group in KERNEL_GROUPS
        for dtype in ("float16", "bfloat16", "float32")
        for name in KERNEL_CHECKS if name.rsplit(" ", 1)[0] == group]
    assert all(verdict == "PASS" for *_, verdict in results), out
    assert out.rstrip().endswith("result: PASS")


def test_wrong_numbers_or_a_raising_kernel_exit_1(device, monkeypatch, capsys):
    def off_by_one_percent(*args, **kwargs):  # the kernels' answer 1% off; the torch reference untouched
        out = real_attention(*args, **kwargs)
        return out * 1.01 if requested_backend() == "triton" else out

    def raising_for_many_ar(*args, **kwargs):
        if requested_backend() == "triton" and args[-1]:  # many_ar
            raise RuntimeError("kernel exploded")
        return real_patch_embed(*args, **kwargs)

    def qknorm_forward_nan(*args, **kwargs):  # gradients right, the forward output NaN where the kernels run
        out = real_qknorm(*args, **kwargs)
        return out + (out.detach() * float("nan")) if requested_backend() == "triton" else out

    real_attention, real_patch_embed = selfcheck.rope_attention, selfcheck.patch_embed
    real_qknorm = selfcheck.qknorm_rope_attention
    monkeypatch.setattr(selfcheck, "rope_attention", off_by_one_percent)
    monkeypatch.setattr(selfcheck, "patch_embed", raising_for_many_ar)
    monkeypatch.setattr(selfcheck, "qknorm_rope_attention", qknorm_forward_nan)
    monkeypatch.setattr(selfcheck, "CHECK_DTYPES", (torch.float32,))  # one dtype keeps the interpreter run short
    assert selfcheck.main([]) == 1
    out = capsys.readouterr().out
    verdicts = {name: verdict for name, _, _, _, verdict in _kernel_results(out, device)}
    assert verdicts == {"rope_attention forward": "FAIL", "rope_attention backward (dq, dk, dv)": "FAIL",
                        "patch_embed forward": "PASS", "patch_embed backward (img, weight, bias)": "PASS",
                        "patch_embed ManyAR forward + backward": "FAIL",
                        "qknorm_rope_attention forward": "FAIL",
                        "qknorm_rope_attention backward (q, k, v, norms)": "PASS"}, out
    assert "raised RuntimeError: kernel exploded" in out
    assert out.rstrip().endswith("result: FAIL (4 failed)")

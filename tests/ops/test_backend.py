"""fastpatch.backend: the one backend choice (auto / triton / torch), its overrides, and decide()."""
import re

import pytest
import torch

from fastpatch import backend
from fastpatch.backend import select_backend, use_backend

from modes import COMPILED, interpreter_only


@pytest.fixture
def environment(monkeypatch):
    """``set(name, value)``: change an environment variable and have fastpatch re-read it; undone after."""
    def set_variable(name: str, value: str) -> None:
        monkeypatch.setenv(name, value)
        backend.refresh_environment()
    yield set_variable
    monkeypatch.undo()
    backend.refresh_environment()


@interpreter_only
def test_interpreter_is_active_in_the_test_suite():
    # conftest.py sets TRITON_INTERPRET=1, so CPU tensors are routed to the Triton kernels.
    assert backend.interpreter_active()
    assert select_backend(torch.zeros(1)) == "triton"


def test_device_fixture_runs_the_triton_kernels(device):
    """Both modes: ``device`` tensors go to Triton (interpreter on CPU, compiled on CUDA); in compiled
    mode the interpreter is off, so CPU tensors take the torch path and forcing Triton on them raises."""
    assert select_backend(torch.zeros(1, device=device)) == "triton"
    assert backend.interpreter_active() is not COMPILED
    if COMPILED:
        assert select_backend(torch.zeros(1)) == "torch"
        with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            select_backend(torch.zeros(1))


def test_auto_uses_torch_on_cpu_without_interpreter(environment):
    environment("TRITON_INTERPRET", "0")
    assert select_backend(torch.zeros(1)) == "torch"


def test_context_manager_overrides_environment(environment, device):
    environment("FASTPATCH_BACKEND", "triton")
    x = torch.zeros(1, device=device)
    with use_backend("torch"):
        assert select_backend(x) == "torch"
        with use_backend("auto"):
            assert select_backend(x) == "triton"
        assert select_backend(x) == "torch"
    assert backend.requested_backend() == "triton"


def test_environment_variable(environment):
    environment("FASTPATCH_BACKEND", "torch")
    assert select_backend(torch.zeros(1)) == "torch"
    environment("FASTPATCH_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTPATCH_BACKEND='cuda'"):
        select_backend(torch.zeros(1))


def test_environment_is_read_once_not_per_call(monkeypatch):
    """Host overhead: a call reads no environment variable; the values read at import hold until a refresh."""
    reads = []

    class RecordingEnviron(dict):
        def get(self, key, default=None):
            reads.append(key)
            return super().get(key, default)

        def __getitem__(self, key):
            reads.append(key)
            return super().__getitem__(key)

    monkeypatch.setattr(backend.os, "environ", RecordingEnviron(backend.os.environ, FASTPATCH_BACKEND="torch"))
    x = torch.zeros(1)
    select_backend(x)
    assert reads == []
    backend.refresh_environment()
    try:
        assert select_backend(x) == "torch"
    finally:
        monkeypatch.undo()
        backend.refresh_environment()


def test_forcing_triton_where_it_cannot_run_raises(environment):
    environment("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        select_backend(torch.zeros(1))


def test_unknown_backend_name_raises():
    with pytest.raises(ValueError, match="expected one of auto, triton, torch"):
        with use_backend("fast"):
            pass


def test_mixed_devices_raise():
    meta = torch.empty(1, device="meta")
    with pytest.raises(ValueError, match="one device"):
        select_backend(torch.zeros(1), meta)


def test_decide_gives_the_backend_and_why_for_each_op(device):
    """One function answers both questions, with the reason the self-check prints."""
    x = torch.zeros(1, device=device)
    for op in backend.OPS:
        decision = backend.decide(op, x)
        assert decision.backend == "triton" and not decision.fallback
        expected = "compiled Triton kernels on CUDA" if COMPILED else "Triton kernels in the interpreter"
        assert decision.reason.startswith(expected)
    with use_backend("torch"):
        assert backend.decide("patch_embed", x) == ("torch", "forced (FASTPATCH_BACKEND=torch or use_backend('torch'))",
                                                    False)
    with use_backend("triton"):
        assert backend.decide("rope_attention", x).reason.endswith("(forced)")


@pytest.mark.parametrize("op, facts, reason", [
    ("rope_attention", dict(dropout_p=0.1), "have no dropout"),
    ("rope_attention", dict(head_dim=48), r"head dims \(32, 64, 128\), got 48"),
    ("rope_attention", dict(dtype=torch.float64), "float16/bfloat16/float32, got torch.float64"),
    ("patch_embed", dict(dtype=torch.float64), "float32/float16/bfloat16, got torch.float64"),
    ("qknorm_rope_attention", dict(dropout_p=0.1), "qk-norm attention kernels have no dropout"),
    ("qknorm_rope_attention", dict(head_dim=48), r"qk-norm .*head dims \(32, 64, 128\), got 48"),
    ("qknorm_rope_attention", dict(dtype=torch.float64), "float16/bfloat16/float32, got torch.float64"),
])
def test_decide_falls_back_where_the_kernels_refuse_the_inputs(device, op, facts, reason):
    decision = backend.decide(op, torch.zeros(1, device=device), **facts)
    assert decision.backend == "torch" and decision.fallback
    assert re.search(reason, decision.reason)
    supported = dict(dropout_p=0.0, head_dim=64, dtype=torch.float16)
    assert backend.decide(op, torch.zeros(1, device=device), **{k: supported[k] for k in facts}).backend == "triton"


def test_decide_device_rules_match_select_backend(environment):
    """select_backend is decide's device part: same answers, same errors."""
    cpu, meta = torch.zeros(1), torch.empty(1, device="meta")
    assert backend.decide(None, meta) == ("torch", "no Triton backend for meta tensors: the torch path", False)
    assert select_backend(meta) == "torch"
    with pytest.raises(ValueError, match="one device"):
        backend.decide("patch_embed", cpu, meta)
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        backend.decide("conv", cpu)
    environment("TRITON_INTERPRET", "0")
    decision = backend.decide("rope_attention", cpu, dropout_p=0.5)  # the device rule comes first: no fallback
    assert decision == ("torch", backend.decide(None, cpu).reason, False) and select_backend(cpu) == "torch"
    assert decision.reason.startswith("CPU tensors run the torch path")
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend.decide("patch_embed", cpu)


def test_the_ops_and_the_self_check_ask_decide():
    """No other place works the rules out again (the self-check prints decide's reasons)."""
    import inspect

    from fastpatch import selfcheck
    from fastpatch.ops import patch_embed, rope_attention

    for module in (patch_embed, rope_attention, selfcheck):
        source = inspect.getsource(module)
        assert "decide(" in source and "select_backend" not in source and "interpreter_active" not in source, module

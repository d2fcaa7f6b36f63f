"""fastpatch.backend: the one backend choice (auto / triton / torch) and its overrides."""
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

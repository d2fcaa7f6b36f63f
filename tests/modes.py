"""The test-suite mode (see tests/conftest.py) and the helpers that depend on it; no side effects on import."""
import os

import pytest
import torch

#: True under ``FASTPATCH_TEST_COMPILED=1``: compiled kernels on CUDA instead of the interpreter on CPU.
COMPILED = os.environ.get("FASTPATCH_TEST_COMPILED", "0") == "1"

#: Marks a test about the Triton interpreter or CPU-only Triton routing: skipped in compiled mode.
interpreter_only = pytest.mark.skipif(
    COMPILED, reason="about the Triton interpreter on CPU; FASTPATCH_TEST_COMPILED=1 runs compiled kernels on CUDA")

#: Marks a slow CPU-only check that the CPU CI already runs identically (AOT compiles, the full-depth
#: CPU model, DDP over gloo): skipped in compiled mode so the GPU run fits its time budget.
cpu_ci_only = pytest.mark.skipif(
    COMPILED, reason="CPU-only check, identical in both modes and run by the CPU CI; skipped to keep the GPU run short")


def device_for(backend: str, device: torch.device) -> torch.device:
    """Where a test parametrised over backends puts our module: ``device`` for ``"triton"`` (the
    kernels: interpreter on CPU, or CUDA), CPU for ``"torch"`` (the torch path, identical in both modes)."""
    return device if backend == "triton" else torch.device("cpu")

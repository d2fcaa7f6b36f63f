"""Test-suite set-up, and the two modes the suite runs in.

Normal mode (default; no GPU needed)
    ``TRITON_INTERPRET=1`` is set here, at import time, before anything imports triton. The
    ``device`` fixture is CPU, and CPU tensors there run the Triton kernels through the
    interpreter (``FASTPATCH_BACKEND=auto``). Every test runs, interpreter-only tests included.

Compiled mode (``FASTPATCH_TEST_COMPILED=1``, on a CUDA machine; see bench/gpu_run.sh)
    The interpreter stays off and the ``device`` fixture is CUDA, so every test that exercises the
    Triton path (it takes ``device``) runs the compiled kernels; its float64 oracle or upstream
    reference is still computed on CPU, and results are compared on CPU. Tests that do not take
    ``device`` run CPU tensors on the torch path exactly as in normal mode (AOT compiles, DDP over
    gloo, import state, torch-path numerics...). Tests about the interpreter itself are marked
    :data:`interpreter_only` and skip with that reason; slow CPU-only checks the CPU CI already runs
    identically (AOT compiles, the full-depth CPU model, DDP over gloo) are marked
    :data:`cpu_ci_only` and skip too, to keep the GPU run inside its time budget. Nothing forces
    Triton on CPU in this mode: that would raise RuntimeError.

* Layout: one folder per area -- ``kernels/`` (Triton kernels and launchers against float64
  references, their config tables), ``aot/`` (Triton ahead-of-time compiles for the GPU classes),
  ``ops/`` (the public ops: backend choice, torch paths, torch.compile, CUDA graphs, torch features),
  ``modules/`` (modules and reference against upstream), ``patching/`` (patch_model), ``engine/``
  (fastpatch.inference), ``bench_tooling/`` (bench/'s sweeps, report, targets, pairs), ``package/``
  (wheel, self-check, triton versions, triton import). This file and the helper modules (``modes``,
  ``upstream``, ``variants``, ``vggt_standins``) stay in ``tests/``, which pytest puts on ``sys.path``
  (this conftest, prepend import mode), so test files import them by name. No ``__init__.py``: test
  file basenames must be unique across the folders.
* ``tests/modes.py`` holds :data:`COMPILED` (the one place the mode is read), the markers and
  :func:`device_for`; test files import them from there. It has no side effects, so scripts such as
  the AOT compile subprocesses can import it without switching the interpreter on.
* fp32 parity on CUDA needs TF32 off: torch's default for matmul, and our kernels use IEEE fp32
  unless ``torch.backends.cuda.matmul.allow_tf32`` is set. cuDNN convolutions default to TF32,
  so fp32 reference convolutions run on CPU, never on the ``device``; the patch-embedding kernels
  follow ``torch.backends.cudnn.allow_tf32`` (like the conv they replace), so the autouse
  ``_ieee_fp32_convolutions`` fixture turns that switch off in every test (a TF32 test sets it).
* The ``upstream`` fixture gives the real DUSt3R model code (``mini-dust3r``, installed test-only)
  with torch's global state restored right after its import (which switches TF32 on) and again
  afterwards; tests skip with a visible reason without it.
"""
import os

from modes import COMPILED

if not COMPILED:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from upstream import UpstreamCode, load_upstream  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where Triton-path tests run: CPU through the interpreter, or CUDA with FASTPATCH_TEST_COMPILED=1."""
    if COMPILED:
        if not torch.cuda.is_available():
            pytest.fail("FASTPATCH_TEST_COMPILED=1 but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture
def upstream() -> UpstreamCode:
    """The upstream DUSt3R modules, imported with torch's global flags restored afterwards."""
    with load_upstream() as code:
        yield code


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _ieee_fp32_convolutions():
    """cuDNN's TF32 switch (on by default) off during each test, restored after."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved

"""Test-suite set-up.

* ``TRITON_INTERPRET=1`` is set here, at import time, before anything imports triton, so CPU
  tensors run the Triton kernels through the interpreter (``FASTPATCH_BACKEND=auto``). Set
  ``FASTPATCH_TEST_COMPILED=1`` on a GPU machine to run the same tests with compiled kernels on
  CUDA instead (``device`` fixture).
* The ``upstream`` fixture gives the real DUSt3R model code (``mini-dust3r``, installed test-only)
  with torch's global state restored around it; tests skip with a visible reason without it.
"""
import os

COMPILED = os.environ.get("FASTPATCH_TEST_COMPILED", "0") == "1"
if not COMPILED:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from upstream import UpstreamCode, load_upstream  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernel tests run: CPU through the interpreter, or CUDA with FASTPATCH_TEST_COMPILED=1."""
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

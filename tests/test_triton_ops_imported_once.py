"""The Triton ops are imported on their first use, once, by :func:`fastpatch.triton_available.imported_once`.

Per op, "a later call imports nothing" is checked in test_patch_embed_lazy_import.py and
test_rope_attention_kernels.py, the import without triton in test_without_triton.py.
"""
import os
import subprocess
import sys

import pytest

from fastpatch.triton_available import imported_once
from modes import interpreter_only


def test_imported_once_loads_on_the_first_call_only():
    loads = []

    @imported_once
    def op():
        loads.append(1)
        return object()

    assert loads == []  # decorating imports nothing
    first = op()
    assert op() is first and op() is first and loads == [1]


def test_imported_once_retries_after_a_failed_load():
    loads = []

    @imported_once
    def op():
        loads.append(1)
        if len(loads) == 1:
            raise ImportError("first try fails")
        return "op"

    with pytest.raises(ImportError, match="first try fails"):
        op()
    assert op() == "op" and op() == "op" and loads == [1, 1]


_FIRST_CALL_COMPILED = r"""
import torch
import fastpatch

img, weight, bias = torch.randn(1, 3, 16, 16), torch.randn(8, 3, 8, 8), torch.randn(8)
q, pos = torch.randn(1, 1, 4, 32), torch.zeros(1, 4, 2, dtype=torch.int64)


def step(img, weight, bias, q, pos):
    tokens, _ = fastpatch.patch_embed(img, weight, bias, 8)
    return tokens.sum() + fastpatch.rope_attention(q, q, q, pos).sum()


with fastpatch.use_backend("triton"):
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(img, weight, bias, q, pos)
    eager = step(img, weight, bias, q, pos)
torch.testing.assert_close(compiled, eager)
print("ok")
"""


@interpreter_only
def test_first_triton_call_inside_torch_compile_fullgraph():
    """In a fresh process the ops' first call is traced: their import is traced too, with no graph break."""
    env = {k: v for k, v in os.environ.items() if k != "FASTPATCH_BACKEND"}
    env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", _FIRST_CALL_COMPILED], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]

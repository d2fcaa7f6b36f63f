"""Triton is imported lazily: on the ops' first Triton use, once, and never where it is missing.

The Triton ops are imported on their first use, once, by :func:`fastpatch.triton_available.imported_once`.
The patch embedding's Triton op is imported on first Triton use, once: ``import fastpatch`` and the torch
path work without triton installed, and later calls import nothing (for the RoPE attention op, "a later
call imports nothing" is checked in tests/kernels/test_rope_attention_kernels.py).

fastpatch where torch has no triton (Windows, macOS, some conda builds): each scenario runs in a fresh
subprocess whose first act is to hide triton: a meta-path finder makes ``import triton`` raise
``ModuleNotFoundError`` as it does where triton is not installed. No GPU is needed: CUDA tensors are
stood in for by ``FakeTensorMode`` tensors on ``cuda`` (shapes, dtypes and devices without data or a
GPU), which go through the same validation and backend choice.

Expected: ``import fastpatch`` works and never imports triton; CPU (and MPS, meta) tensors run the torch
path silently; tensors the kernels would take (CUDA, or CPU under ``TRITON_INTERPRET=1``) run the torch
path with one ``RuntimeWarning`` per process saying why; forcing ``triton`` raises ``RuntimeError``.
"""
import builtins
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import fastpatch
import fastpatch.triton_available as triton_available
from fastpatch.backend import select_backend, use_backend
from fastpatch.ops import patch_embed as ops
from fastpatch.ops import patch_embed_triton
from fastpatch.triton_available import imported_once
from modes import interpreter_only


# --- imported_once: the ops' first use imports them, once ----------------------------------------


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


# --- the patch embedding's Triton op: imported on first Triton use, once -------------------------


_WITHOUT_TRITON = r"""
import sys
sys.modules["triton"] = None  # what an environment without triton looks like to `import triton`
import torch
import fastpatch

img = torch.randn(2, 3, 16, 32)
module = fastpatch.ManyAR_PatchEmbed((16, 32), 8, 3, 8)
tokens, pos = module(img, torch.tensor([[16, 32], [32, 16]]))
assert tokens.shape == (2, 8, 8) and pos.shape == (2, 8, 2)
tokens, pos = fastpatch.PatchEmbedDust3R((16, 32), 8, 3, 8)(img)
assert tokens.shape == (2, 8, 8)
print("ok")
"""


def test_import_and_torch_path_work_without_triton():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTPATCH_BACKEND")}
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_triton_op_is_resolved_once(monkeypatch, device):
    """After the first Triton call the op is cached in the module: a later call imports none of
    fastpatch's modules (triton's own launch machinery may import its internals)."""
    args = (torch.randn(1, 3, 8, 8).to(device), torch.randn(4, 3, 8, 8).to(device), torch.randn(4).to(device), 8)
    with fastpatch.use_backend("triton"):
        fastpatch.patch_embed(*args)
        assert ops._triton_op() is patch_embed_triton.patch_embed_triton
        imports = []
        real_import = builtins.__import__
        monkeypatch.setattr(builtins, "__import__", lambda name, *rest, **kw: imports.append(name) or
                            real_import(name, *rest, **kw))
        fastpatch.patch_embed(*args)
        monkeypatch.undo()
    assert [name for name in imports if "patch_embed" in name or name.startswith("fastpatch")] == []


# --- fastpatch where torch has no triton ---------------------------------------------------------


ROOT = Path(__file__).resolve().parents[2]

HIDE_TRITON = '''
import sys

class _NoTriton:
    """Meta-path finder: ``import triton`` (and its submodules) fails as if triton were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, _NoTriton())
'''

# Imported after the finder is in place: a tiny DUSt3R backbone (fastpatch.reference), patched in place.
COMMON = '''
import warnings

import torch
import fastpatch
from fastpatch.reference import dust3r_backbone
from fastpatch.testing import TOLERANCES, relative_error

assert "triton" not in sys.modules, "import fastpatch imported triton"
FP32 = TOLERANCES[torch.float32].forward
TINY = dict(img_size=(32, 48), enc_embed_dim=64, enc_depth=1, enc_num_heads=2, dec_embed_dim=64, dec_depth=1,
            dec_num_heads=2)


def tiny_model(patch_embed_cls="ManyAR_PatchEmbed"):
    torch.manual_seed(0)
    return dust3r_backbone("DUSt3R_ViTLarge_BaseDecoder_224", patch_embed_cls=patch_embed_cls, **TINY).eval()


def pair():
    gen = torch.Generator().manual_seed(1)
    img1, img2 = (torch.randn(2, 3, 32, 48, generator=gen) for _ in range(2))
    shape = torch.tensor([[32, 48], [48, 32]])  # one portrait sample, true_shape left on the CPU
    return img1, img2, shape, shape


def fastpatch_warnings(caught):
    return [str(w.message) for w in caught if "fastpatch" in str(w.message)]
'''

CPU_MODEL = '''
model = tiny_model()
with torch.no_grad():
    expected = model(*pair())
    fastpatch.patch_model(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = model(*pair())
for a, e in zip(actual[0] + actual[1], expected[0] + expected[1]):
    assert relative_error(a, e) <= FP32, relative_error(a, e)
'''


def _run(script: str, interpret: bool = False) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTPATCH_BACKEND")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    code = HIDE_TRITON + COMMON + textwrap.dedent(script) + '\nassert "triton" not in sys.modules\nprint("OK")\n'
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
    return proc.stdout


def test_cpu_runs_the_torch_path_silently_and_forcing_triton_raises():
    _run(CPU_MODEL + '''
assert fastpatch_warnings(caught) == [], fastpatch_warnings(caught)
assert fastpatch.triton_available.triton_import_error().startswith("ModuleNotFoundError")

for device in ("meta", "cpu"):
    x = torch.empty(2, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fastpatch.backend.select_backend(x) == "torch"
    assert fastpatch_warnings(caught) == []

with fastpatch.use_backend("triton"):
    try:
        model(*pair())
    except RuntimeError as exc:
        assert "'triton' was forced" in str(exc), exc
    else:
        raise AssertionError("forcing triton on CPU without triton did not raise")
''')


def test_cuda_tensors_run_the_torch_path_with_one_warning():
    # A real "cuda" device through the real rule: FakeTensorMode tensors (no GPU, no data). A whole
    # patched model: meta tensors stand in for CUDA (FakeTensorMode cannot run every op on "cuda" in a
    # CPU-only torch), with the device rule told that meta is where the kernels would run.
    _run('''
from torch._subclasses.fake_tensor import FakeTensorMode
import fastpatch.backend as backend

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with FakeTensorMode(), torch.no_grad():
        q = torch.empty(1, 2, 8, 32, device="cuda")
        assert backend.select_backend(q) == "torch"
        assert fastpatch.rope_attention(q, q, q, None, rope_base=None).device.type == "cuda"
        with fastpatch.use_backend("triton"):
            try:
                backend.select_backend(q)
            except RuntimeError as exc:
                assert "triton cannot be imported" in str(exc) and "cuda" in str(exc), exc
            else:
                raise AssertionError("forcing triton on CUDA without triton did not raise")

    backend._triton_can_run = lambda device: device.type in ("cuda", "meta")
    model = fastpatch.patch_model(tiny_model()).to("meta")
    img1, img2, shape1, shape2 = pair()  # true_shape stays on the CPU, as dust3r leaves it
    with torch.no_grad():
        for _ in range(2):
            out1, out2 = model(img1.to("meta"), img2.to("meta"), shape1, shape2)
    assert out1[-1].device.type == "meta" and out1[-1].shape == (2, 6, 64), (out1[-1].device, out1[-1].shape)
messages = fastpatch_warnings(caught)
assert len(messages) == 1, messages
assert "triton cannot be imported (ModuleNotFoundError" in messages[0] and "torch path" in messages[0], messages

with fastpatch.use_backend("triton"):
    try:
        model(img1.to("meta"), img2.to("meta"), shape1, shape2)
    except RuntimeError as exc:
        assert "triton cannot be imported" in str(exc), exc
    else:
        raise AssertionError("forcing triton without triton did not raise")
''')


def test_interpreter_requested_without_triton_runs_the_torch_path_with_one_warning():
    _run(CPU_MODEL + '''
messages = fastpatch_warnings(caught)
assert len(messages) == 1 and "triton cannot be imported" in messages[0], messages
with fastpatch.use_backend("triton"):
    try:
        model(*pair())
    except RuntimeError as exc:
        assert "triton cannot be imported" in str(exc), exc
    else:
        raise AssertionError("forcing triton without triton did not raise")
''', interpret=True)


class _On:
    """Stands in for a tensor on ``device``: backend selection reads nothing but ``.device``."""

    def __init__(self, device: str):
        self.device = torch.device(device)


@pytest.fixture
def no_triton(monkeypatch):
    """This process's cached answer says triton does not import, and no warning was given yet."""
    monkeypatch.setattr(triton_available, "_import_error", "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setattr(triton_available, "_warned", False)


def test_selection_without_triton(no_triton):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [select_backend(_On(d)) for d in ("cuda", "cuda:1", "cpu", "mps", "meta")] == ["torch"] * 5
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    assert "triton cannot be imported (ModuleNotFoundError" in str(caught[0].message)
    with use_backend("triton"), pytest.raises(RuntimeError, match="triton cannot be imported"):
        select_backend(_On("cuda"))
    with use_backend("torch"):
        assert select_backend(_On("cuda")) == "torch"


def test_selection_with_triton_is_unchanged(monkeypatch):
    monkeypatch.setattr(triton_available, "_import_error", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_backend(_On("cuda")) == "triton"
        assert select_backend(_On("mps")) == "torch"

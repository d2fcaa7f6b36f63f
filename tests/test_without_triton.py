"""fastpatch where torch has no triton (Windows, macOS, some conda builds).

Each scenario runs in a fresh subprocess whose first act is to hide triton: a meta-path finder
makes ``import triton`` raise ``ModuleNotFoundError`` as it does where triton is not installed. No GPU
is needed: CUDA tensors are stood in for by ``FakeTensorMode`` tensors on ``cuda`` (shapes, dtypes and
devices without data or a GPU), which go through the same validation and backend choice.

Expected: ``import fastpatch`` works and never imports triton; CPU (and MPS, meta) tensors run the torch
path silently; tensors the kernels would take (CUDA, or CPU under ``TRITON_INTERPRET=1``) run the torch
path with one ``RuntimeWarning`` per process saying why; forcing ``triton`` raises ``RuntimeError``.
"""
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import fastpatch.triton_available as triton_available
from fastpatch.backend import select_backend, use_backend

ROOT = Path(__file__).resolve().parents[1]

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

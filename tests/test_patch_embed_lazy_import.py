"""The patch embedding's Triton op is imported on first Triton use, once: ``import fastpatch`` and
the torch path work without triton installed, and later calls import nothing."""
import builtins
import os
import subprocess
import sys

import torch

import fastpatch
from fastpatch.ops import patch_embed as ops
from fastpatch.ops import patch_embed_triton

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

"""Patch embedding: the eager upstream-style module (conv2d + flatten + transpose, positions from a
separate grid; :class:`fastpatch.reference.PatchEmbedDust3R`) against :class:`fastpatch.PatchEmbedDust3R`
with the same weights. ViT-L width (embed_dim 1024), patch 16, 224x224 and 512x384 (H x W 384x512),
batch 1; float32 on CPU (where fastpatch runs its torch path), float32 and bfloat16 on CUDA (the
Triton kernel, against the torch path too). ``FASTPATCH_BENCH_FULL=1`` adds batch 8. Inference.
"""
import pytest
import torch

import fastpatch
from fastpatch import reference

from . import flops
from .cases import BACKENDS, DEVICE, EAGER, FULL, Case, Side, base_providers, make_step, measure

EMBED_DIM = 1024
PATCH = 16
SIZES = [(224, 224), (384, 512)]
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
CASES = [Case("patch_embed", "forward", f"{h}x{w}", batch, dtype, DEVICE)
         for dtype in DTYPES for h, w in SIZES for batch in ([1, 8] if FULL else [1])]
ROUNDS = 20 if DEVICE == "cuda" else 10


def build_sides(case: Case):
    """Every provider's call on one shared image and one set of weights."""
    height, width = (int(v) for v in case.size.split("x"))
    torch.manual_seed(0)
    img = torch.randn(case.batch, 3, height, width).to(case.device, case.dtype)
    eager = reference.PatchEmbedDust3R((height, width), PATCH, 3, EMBED_DIM).to(case.device, case.dtype).eval()
    patched = fastpatch.PatchEmbedDust3R((height, width), PATCH, 3, EMBED_DIM).to(case.device, case.dtype).eval()
    patched.load_state_dict(eager.state_dict())
    return {name: Side(make_step(eager if name == EAGER else patched, (img,), case.mode, case.device, BACKENDS[name]))
            for name in base_providers(case.device)}


def case_flops(case: Case) -> float:
    height, width = (int(v) for v in case.size.split("x"))
    return flops.patch_embed(case.batch, (height // PATCH) * (width // PATCH), EMBED_DIM, PATCH)


@pytest.mark.parametrize("provider", base_providers())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_patch_embed(benchmark, case, provider):
    benchmark.group = case.name
    measure(benchmark, case, provider, build_sides(case), case_flops(case), rounds=ROUNDS, warmup_rounds=2)

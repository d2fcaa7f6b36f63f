"""Patch embedding: the eager upstream-style module (conv2d + flatten + transpose, positions from
a separate grid; :class:`fastpatch.reference.PatchEmbedDust3R`) against :class:`fastpatch.PatchEmbedDust3R`
with the same weights. ViT-L width (embed_dim 1024), patch 16, 224x224 and 512x384 (H x W 384x512),
batch 1 and 8; float32 on CPU (where fastpatch runs its torch path), plus float32 and bfloat16
on CUDA (the Triton kernel) when a GPU is present. Inference (no grad)."""
import pytest
import torch

import fastpatch
from fastpatch import reference

from cases import image_cases, run_side, synchronize

EMBED_DIM = 1024
PATCH = 16
CASES = image_cases(sizes=[(224, 224), (384, 512)], batches=[1, 8],
                    dtypes_per_device={"cpu": [torch.float32], "cuda": [torch.float32, torch.bfloat16]})
ROUNDS = 10


def _shared(case):
    """Image and weights both sides use."""
    torch.manual_seed(0)
    eager = reference.PatchEmbedDust3R((case.height, case.width), PATCH, 3, EMBED_DIM)
    img = torch.randn(case.batch, 3, case.height, case.width)
    return {"state_dict": eager.state_dict(), "img": img.to(case.device, case.dtype)}


def _module_runner(cls):
    def factory(case, shared):
        module = cls((case.height, case.width), PATCH, 3, EMBED_DIM)
        module.load_state_dict(shared["state_dict"])
        module = module.to(case.device, case.dtype).eval()
        img = shared["img"]

        def run():
            with torch.no_grad():
                out = module(img)
            synchronize(case.device)
            return out
        return run
    return factory


PROVIDERS = {"eager": _module_runner(reference.PatchEmbedDust3R), "fastpatch": _module_runner(fastpatch.PatchEmbedDust3R)}
PARTNER = {"eager": "fastpatch", "fastpatch": "eager"}


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_patch_embed(benchmark, case, provider):
    benchmark.group = f"patch_embed-{case.name}"
    shared = _shared(case)
    run = PROVIDERS[provider](case, shared)
    partner = PROVIDERS[PARTNER[provider]](case, shared)
    eager = run if provider == "eager" else partner
    run_side(benchmark, run, partner, reference=eager, rounds=ROUNDS)

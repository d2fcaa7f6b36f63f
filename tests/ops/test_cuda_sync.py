"""On CUDA, a patched model's forward and backward make no device-to-host synchronisation.

``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising CUDA call into an error, so this
checks the real kernels and launchers (on CPU the dispatch-mode spy of ``test_torch_compile.py`` covers the
torch path and the Triton path by construction). Runs only in compiled mode (FASTPATCH_TEST_COMPILED=1,
see conftest.py): in the normal mode the interpreter would run CUDA tensors through host copies.
"""
import pytest
import torch

import fastpatch
from fastpatch import reference

from modes import COMPILED

pytestmark = pytest.mark.skipif(not COMPILED, reason="needs compiled kernels on CUDA (FASTPATCH_TEST_COMPILED=1)")

SMALL = dict(img_size=(64, 96), patch_size=16, enc_embed_dim=128, enc_depth=2, enc_num_heads=2, dec_embed_dim=128,
             dec_depth=2, dec_num_heads=2)


@pytest.mark.parametrize("patch_embed_cls", ["PatchEmbedDust3R", "ManyAR_PatchEmbed"])
def test_patched_forward_and_backward_do_not_sync(patch_embed_cls, device):
    model = fastpatch.patch_model(reference.Dust3RBackbone(patch_embed_cls=patch_embed_cls, **SMALL).to(device))
    img1, img2 = torch.randn(2, 2, 3, 64, 96, device=device).unbind(0)
    shape = torch.tensor([[64, 96], [64, 96]], device=device)

    def step():
        out1, out2 = model(img1, img2, shape, shape)
        loss = sum(o.float().square().mean() for o in out1 + out2)
        loss.backward()
        return loss.detach()

    step()  # compiles the kernels and fills the per-device caches (one-time host-to-device copies)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.isfinite(loss).item()

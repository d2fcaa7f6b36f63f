"""Patch embedding parity with the real upstream DUSt3R modules (mini-dust3r), weights perturbed:
forward tokens/positions and the gradients of image, weight and bias, float32, both backends.
Upstream runs on CPU (a CUDA conv would use TF32); ours on the ``device`` fixture for the Triton
path (interpreter on CPU, or CUDA in compiled mode), on CPU for the torch path."""
import pytest
import torch

import fastpatch
from fastpatch.testing import assert_close_to_reference
from upstream import perturb_

from modes import device_for

BACKENDS = ["triton", "torch"]

CASES = {
    # name: (class, image (B, 3, H, W), true_shape rows or None)
    "dust3r_landscape": ("PatchEmbedDust3R", (2, 3, 48, 64), None),
    "dust3r_portrait": ("PatchEmbedDust3R", (1, 3, 80, 32), None),
    "manyar_mixed": ("ManyAR_PatchEmbed", (3, 3, 32, 48), [(32, 48), (48, 32), (32, 48)]),
    "manyar_square": ("ManyAR_PatchEmbed", (2, 3, 32, 32), [(32, 32), (32, 32)]),
}


def _run(module, img, true_shape, grad_tokens, device):
    """Tokens, positions and grads (image, weight, bias) of ``module`` run on ``device``, returned on CPU."""
    module.to(device)
    x = img.detach().clone().to(device).requires_grad_()
    true_shape = None if true_shape is None else true_shape.to(device)
    tokens, pos = module(x, true_shape=true_shape)
    tokens.backward(grad_tokens.to(device))
    grads = (x.grad, module.proj.weight.grad, module.proj.bias.grad)
    return tokens.detach().cpu(), pos.cpu(), tuple(g.cpu() for g in grads)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_upstream_float32(upstream, name, backend, device):
    cls_name, shape, rows = CASES[name]
    embed_dim = 40
    theirs = perturb_(upstream.patch_embed.get_patch_embed(cls_name, shape[-2:], 16, embed_dim))
    ours = fastpatch.get_patch_embed(cls_name, shape[-2:], 16, embed_dim)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())

    img = torch.randn(shape)
    true_shape = None if rows is None else torch.tensor(rows)
    grad_tokens = torch.randn(shape[0], (shape[2] // 16) * (shape[3] // 16), embed_dim)

    with fastpatch.use_backend(backend):
        tokens, pos, grads = _run(ours, img, true_shape, grad_tokens, device_for(backend, device))
    ref_tokens, ref_pos, ref_grads = _run(theirs, img, true_shape, grad_tokens, torch.device("cpu"))

    assert torch.equal(pos, ref_pos)
    assert_close_to_reference(tokens, ref_tokens, torch.float32, what="tokens vs upstream")
    for what, grad, ref in zip(("grad img", "grad weight", "grad bias"), grads, ref_grads):
        assert_close_to_reference(grad, ref, torch.float32, kind="backward", what=f"{what} vs upstream")

"""Patch embedding parity with the real upstream DUSt3R modules (mini-dust3r), weights perturbed:
forward tokens/positions and the gradients of image, weight and bias, float32, both backends."""
import pytest
import torch

import fastpatch
from fastpatch.testing import assert_close_to_reference
from upstream import perturb_

BACKENDS = ["triton", "torch"]

CASES = {
    # name: (class, image (B, 3, H, W), true_shape rows or None)
    "dust3r_landscape": ("PatchEmbedDust3R", (2, 3, 48, 64), None),
    "dust3r_portrait": ("PatchEmbedDust3R", (1, 3, 80, 32), None),
    "manyar_mixed": ("ManyAR_PatchEmbed", (3, 3, 32, 48), [(32, 48), (48, 32), (32, 48)]),
    "manyar_square": ("ManyAR_PatchEmbed", (2, 3, 32, 32), [(32, 32), (32, 32)]),
}


def _run(module, img, true_shape, grad_tokens):
    x = img.clone().requires_grad_()
    tokens, pos = module(x, true_shape=true_shape)
    tokens.backward(grad_tokens)
    return tokens.detach(), pos, (x.grad, module.proj.weight.grad, module.proj.bias.grad)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_upstream_float32(upstream, name, backend, device):
    cls_name, shape, rows = CASES[name]
    embed_dim = 40
    theirs = perturb_(upstream.patch_embed.get_patch_embed(cls_name, shape[-2:], 16, embed_dim)).to(device)
    ours = fastpatch.get_patch_embed(cls_name, shape[-2:], 16, embed_dim).to(device)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())

    img = torch.randn(shape, device=device)
    true_shape = None if rows is None else torch.tensor(rows, device=device)
    grad_tokens = torch.randn(shape[0], (shape[2] // 16) * (shape[3] // 16), embed_dim, device=device)

    with fastpatch.use_backend(backend):
        tokens, pos, grads = _run(ours, img, true_shape, grad_tokens)
    ref_tokens, ref_pos, ref_grads = _run(theirs, img, true_shape, grad_tokens)

    assert torch.equal(pos, ref_pos)
    assert_close_to_reference(tokens, ref_tokens, torch.float32, what="tokens vs upstream")
    for what, grad, ref in zip(("grad img", "grad weight", "grad bias"), grads, ref_grads):
        assert_close_to_reference(grad, ref, torch.float32, kind="backward", what=f"{what} vs upstream")

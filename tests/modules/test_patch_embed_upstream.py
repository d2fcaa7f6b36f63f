"""Patch embedding parity with the real upstream DUSt3R modules (mini-dust3r), weights perturbed:
forward tokens/positions and the gradients of image, weight and bias, float32 and under bf16
autocast, both backends (and :mod:`fastpatch.reference` under autocast). Upstream runs on CPU (a
CUDA conv would use TF32); ours on the ``device`` fixture for the Triton path (interpreter on CPU,
or CUDA in compiled mode), on CPU for the torch path."""
import pytest
import torch

import fastpatch
from fastpatch import reference
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


def _run(module, img, true_shape, grad_tokens, device, autocast=None):
    """Tokens, positions and grads (image, weight, bias) of ``module`` run on ``device`` (under
    ``autocast`` to that dtype when given), returned on CPU."""
    module.to(device)
    x = img.detach().clone().to(device).requires_grad_()
    true_shape = None if true_shape is None else true_shape.to(device)
    with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        tokens, pos = module(x, true_shape=true_shape)
    tokens.backward(grad_tokens.to(device, tokens.dtype))
    grads = (x.grad, module.proj.weight.grad, module.proj.bias.grad)
    return tokens.detach().cpu(), pos.cpu(), tuple(g.cpu() for g in grads)


def _modules(upstream, cls_name, shape, embed_dim=40):
    """(theirs, ours) built with the same arguments, ours holding their perturbed weights."""
    theirs = perturb_(upstream.patch_embed.get_patch_embed(cls_name, shape[-2:], 16, embed_dim))
    ours = fastpatch.get_patch_embed(cls_name, shape[-2:], 16, embed_dim)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _problem(name, embed_dim=40):
    """(class name, image, true_shape or None, grad_tokens) of case ``name``."""
    cls_name, shape, rows = CASES[name]
    img = torch.randn(shape)
    true_shape = None if rows is None else torch.tensor(rows)
    grad_tokens = torch.randn(shape[0], (shape[2] // 16) * (shape[3] // 16), embed_dim)
    return cls_name, img, true_shape, grad_tokens


def _assert_same_under_autocast(actual, expected, what):
    """Same token dtype as upstream under autocast, values and fp32 gradients within bf16 bounds."""
    (tokens, pos, grads), (ref_tokens, ref_pos, ref_grads) = actual, expected
    assert tokens.dtype == ref_tokens.dtype, f"{what}: tokens {tokens.dtype}, upstream {ref_tokens.dtype}"
    assert torch.equal(pos, ref_pos)
    assert_close_to_reference(tokens, ref_tokens, torch.bfloat16, what=f"{what} tokens vs upstream")
    for grad_name, grad, ref in zip(("grad img", "grad weight", "grad bias"), grads, ref_grads):
        assert grad.dtype == ref.dtype == torch.float32
        assert_close_to_reference(grad, ref, torch.bfloat16, kind="backward", what=f"{what} {grad_name} vs upstream")


@pytest.mark.parametrize("name", ["dust3r_landscape", "manyar_mixed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_upstream_under_autocast(upstream, name, backend, device):
    """bf16 autocast on fp32 images: upstream PatchEmbedDust3R returns conv2d's bf16 tokens,
    upstream ManyAR_PatchEmbed fp32 ones (it writes them into a buffer of the image's dtype); ours
    return the same dtypes and values."""
    cls_name, img, true_shape, grad_tokens = _problem(name)
    theirs, ours = _modules(upstream, cls_name, img.shape)
    with fastpatch.use_backend(backend):
        actual = _run(ours, img, true_shape, grad_tokens, device_for(backend, device), torch.bfloat16)
    expected = _run(theirs, img, true_shape, grad_tokens, torch.device("cpu"), torch.bfloat16)
    assert expected[0].dtype == (torch.float32 if cls_name == "ManyAR_PatchEmbed" else torch.bfloat16)
    _assert_same_under_autocast(actual, expected, f"fastpatch {cls_name} ({backend})")


@pytest.mark.parametrize("name", ["dust3r_landscape", "manyar_mixed"])
def test_reference_matches_upstream_under_autocast(upstream, name):
    cls_name, img, true_shape, grad_tokens = _problem(name)
    theirs, _ = _modules(upstream, cls_name, img.shape)
    ref = reference.get_patch_embed(cls_name, img.shape[-2:], 16, 40)
    ref.load_state_dict(theirs.state_dict())
    cpu = torch.device("cpu")
    actual = _run(ref, img, true_shape, grad_tokens, cpu, torch.bfloat16)
    expected = _run(theirs, img, true_shape, grad_tokens, cpu, torch.bfloat16)
    _assert_same_under_autocast(actual, expected, f"reference {cls_name}")


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_upstream_float32(upstream, name, backend, device):
    cls_name, img, true_shape, grad_tokens = _problem(name)
    theirs, ours = _modules(upstream, cls_name, img.shape)

    with fastpatch.use_backend(backend):
        tokens, pos, grads = _run(ours, img, true_shape, grad_tokens, device_for(backend, device))
    ref_tokens, ref_pos, ref_grads = _run(theirs, img, true_shape, grad_tokens, torch.device("cpu"))

    assert torch.equal(pos, ref_pos)
    assert_close_to_reference(tokens, ref_tokens, torch.float32, what="tokens vs upstream")
    for what, grad, ref in zip(("grad img", "grad weight", "grad bias"), grads, ref_grads):
        assert_close_to_reference(grad, ref, torch.float32, kind="backward", what=f"{what} vs upstream")

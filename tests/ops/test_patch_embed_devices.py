"""ManyAR ``true_shape`` on the CPU while the image is on another device, as dust3r leaves it
(``loss_of_one_batch`` moves every view tensor but ``true_shape``; ``_encode_symmetrized`` builds a
CPU one). The ``meta`` device stands in for CUDA on a machine without a GPU: the torch path runs on
meta tensors and the Triton custom op has a fake implementation; under FASTPATCH_TEST_COMPILED=1
the ``device`` fixture is CUDA and the same tests cross real devices."""
import pytest
import torch

import fastpatch
from fastpatch import reference
from fastpatch.backend import Decision
from fastpatch.ops import patch_embed as ops
from fastpatch.ops import patch_embed_triton
from fastpatch.ops.patch_embed import patch_embed
from fastpatch.testing import assert_close_to_reference

from modes import COMPILED

HOST_TRUE_SHAPE = torch.tensor([[16, 32], [32, 16], [16, 32]])  # landscape, portrait, landscape
PORTRAIT = [False, True, False]


def _params(device, requires_grad=False):
    img = torch.randn(3, 3, 16, 32).to(device)
    weight = (torch.randn(8, 3, 8, 8) * 0.1).to(device)
    bias = torch.randn(8).to(device)
    return [t.requires_grad_(requires_grad) for t in (img, weight, bias)]


def _record_portrait(monkeypatch, module, name):
    """Wrap ``module.name`` (a patch-embedding implementation) to record the portrait flags it gets."""
    seen = []
    original = getattr(module, name)

    def spy(img, weight, bias, patch_size, portrait=None):
        seen.append(portrait)
        return original(img, weight, bias, patch_size, portrait)

    monkeypatch.setattr(module, name, spy)
    return seen


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_host_true_shape_with_image_on_another_device(monkeypatch, path):
    """Image and weights on ``meta``, true_shape on the CPU: the flags reach the implementation as a
    (B,) bool tensor on the image's device, and forward and backward give the right shapes."""
    if path == "triton":  # meta tensors cannot run Triton: route them to the custom op (its fake impl)
        monkeypatch.setattr(ops, "decide", lambda op, *tensors, **facts: Decision("triton", "routed by the test"))
        seen = _record_portrait(monkeypatch, patch_embed_triton, "_patch_embed_fwd")
    else:
        seen = _record_portrait(monkeypatch, ops, "patch_embed_torch")
    img, weight, bias = _params("meta", requires_grad=True)
    tokens, pos = patch_embed(img, weight, bias, 8, HOST_TRUE_SHAPE, many_ar=True)
    assert [(p.device, p.dtype, tuple(p.shape)) for p in seen] == [(torch.device("meta"), torch.bool, (3,))]
    assert tokens.device == pos.device == torch.device("meta")
    assert tokens.shape == (3, 8, 8) and pos.shape == (3, 8, 2)
    tokens.sum().backward()
    assert img.grad.shape == img.shape and weight.grad.shape == weight.shape and bias.grad.shape == bias.shape


def test_module_accepts_host_true_shape():
    module = fastpatch.ManyAR_PatchEmbed((16, 32), 8, 3, 8).to("meta")
    tokens, pos = module(torch.empty(3, 3, 16, 32, device="meta"), HOST_TRUE_SHAPE)
    assert tokens.device.type == "meta" and tokens.shape == (3, 8, 8) and pos.shape == (3, 8, 2)


def test_host_true_shape_values_are_checked_on_the_host():
    img, weight, bias = _params("meta")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        patch_embed(img, weight, bias, 8, torch.tensor([[16, 32], [32, 17], [16, 32]]), many_ar=True)


def test_true_shape_on_the_image_device_is_never_read_on_the_host():
    """On the image's (accelerator) device the values stay unread: no host synchronisation. A meta
    tensor has no values, so any host read would raise."""
    img, weight, bias = _params("meta")
    tokens, _ = patch_embed(img, weight, bias, 8, HOST_TRUE_SHAPE.to("meta"), many_ar=True)
    assert tokens.shape == (3, 8, 8)


def test_true_shape_on_a_third_device_is_rejected():
    img, weight, bias = _params("cpu")
    with pytest.raises(ValueError, match=r"true_shape must be on the image's device \(cpu\) or on the CPU, got meta"):
        patch_embed(img, weight, bias, 8, HOST_TRUE_SHAPE.to("meta"), many_ar=True)


@pytest.mark.parametrize("moved", ["weight", "bias", "img"])
def test_image_weight_bias_on_different_devices_raise(moved):
    tensors = dict(zip(("img", "weight", "bias"), _params("cpu")))
    tensors[moved] = tensors[moved].to("meta")
    with pytest.raises(ValueError, match="expected all tensors on one device, got"):
        patch_embed(tensors["img"], tensors["weight"], tensors["bias"], 8, HOST_TRUE_SHAPE, many_ar=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_host_true_shape_numerics(backend, device):
    """The flags built from a CPU true_shape give the reference tokens, positions and gradients
    (Triton: interpreter on CPU, or CUDA with a CPU true_shape in compiled mode)."""
    on = device if backend == "triton" else torch.device("cpu")
    img, weight, bias = _params(on, requires_grad=True)
    grad_tokens = torch.randn(3, 8, 8)
    with fastpatch.use_backend(backend):
        tokens, pos = patch_embed(img, weight, bias, 8, HOST_TRUE_SHAPE, many_ar=True)
    tokens.backward(grad_tokens.to(on))

    ref = reference.ManyAR_PatchEmbed((16, 32), 8, 3, 8).double()
    with torch.no_grad():
        ref.proj.weight.copy_(weight.detach().cpu())
        ref.proj.bias.copy_(bias.detach().cpu())
    ref_img = img.detach().cpu().double().requires_grad_()
    ref_tokens, ref_pos = ref(ref_img, HOST_TRUE_SHAPE)
    ref_tokens.backward(grad_tokens.double())
    assert torch.equal(pos.cpu(), ref_pos)
    assert [bool(p[:, 0].max() > 1) for p in pos.cpu()] == PORTRAIT  # portrait grids have 4 rows
    assert_close_to_reference(tokens, ref_tokens, torch.float32, what="tokens")
    for what, grad, expected in (("grad img", img.grad, ref_img.grad), ("grad weight", weight.grad, ref.proj.weight.grad),
                                 ("grad bias", bias.grad, ref.proj.bias.grad)):
        assert_close_to_reference(grad, expected, torch.float32, kind="backward", what=what)


@pytest.mark.skipif(not COMPILED, reason="needs compiled kernels on CUDA (FASTPATCH_TEST_COMPILED=1)")
@pytest.mark.parametrize("true_shape_on", ["cpu", "image device"])
def test_no_device_synchronisation(true_shape_on, device):
    """A CPU true_shape is read on the host and its flags copied without blocking; one on the
    image's device is never read: neither synchronises (sync debug mode 'error' raises if one did)."""
    img, weight, bias = _params(device, requires_grad=True)
    true_shape = HOST_TRUE_SHAPE if true_shape_on == "cpu" else HOST_TRUE_SHAPE.to(device)

    def step():
        tokens, _ = patch_embed(img, weight, bias, 8, true_shape, many_ar=True)
        tokens.square().sum().backward()

    step()  # compiles the kernels, fills per-device caches
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)

"""Patch embedding: fastpatch (Triton on the ``device`` fixture: through the interpreter on CPU, or
compiled on CUDA; and the torch path on CPU) against the float64 eager reference
(:mod:`fastpatch.reference`, on CPU), forward and backward; layouts; modules; bad inputs."""
import contextlib
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

import fastpatch
from fastpatch import reference
from fastpatch.ops import patch_embed_triton
from fastpatch.ops.patch_embed import patch_embed
from fastpatch.testing import assert_close_to_reference, relative_error

from modes import device_for

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["triton", "torch"]


@dataclass(frozen=True)
class Case:
    """One patch-embedding problem: a stored (B, C_in, grid_h*p, grid_w*p) batch."""

    name: str
    batch: int
    embed_dim: int
    patch: int
    grid_h: int
    grid_w: int
    portrait: Optional[Tuple[bool, ...]] = None  # ManyAR orientation per sample; None: PatchEmbedDust3R
    layout: str = "nchw"  # "nchw", "channels_last" or "sliced" (a non-contiguous view)

    def inputs(self, dtype: torch.dtype, device: torch.device):
        """(img, weight, bias, true_shape) in ``dtype`` on ``device``; true_shape is None without ManyAR.

        The image moves to ``device`` before it is sliced or made channels-last, so the layout is kept."""
        height, width = self.grid_h * self.patch, self.grid_w * self.patch
        img = torch.randn(self.batch, 3, height, width + (5 if self.layout == "sliced" else 0)).to(device, dtype)
        if self.layout == "sliced":
            img = img[..., 2:2 + width]
        elif self.layout == "channels_last":
            img = img.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(self.embed_dim, 3, self.patch, self.patch) * self.patch ** -1
        bias = torch.randn(self.embed_dim)
        true_shape = None
        if self.portrait is not None:
            true_shape = torch.tensor([(width, height) if p else (height, width) for p in self.portrait])
            true_shape = true_shape.to(device)
        return img, weight.to(device, dtype), bias.to(device, dtype), true_shape


SMALL_CASES = [
    Case("p14_manyar_mixed", 3, 48, 14, 2, 3, portrait=(False, True, False)),
    Case("p16_channels_last_manyar", 2, 64, 16, 2, 3, portrait=(True, False), layout="channels_last"),
    Case("p8_sliced", 2, 32, 8, 3, 5, layout="sliced"),
]
ODD_GRID = Case("p8_odd_grid_23x37", 3, 32, 8, 23, 37, portrait=(True, False, True))


def oracle(img, weight, bias, patch, true_shape, grad_tokens):
    """float64 tokens, positions and grads (img, weight, bias) from the eager reference modules."""
    many_ar = true_shape is not None
    cls = reference.ManyAR_PatchEmbed if many_ar else reference.PatchEmbedDust3R
    module = cls(img.shape[-2:], patch, 3, weight.shape[0]).double()
    with torch.no_grad():
        module.proj.weight.copy_(weight.cpu().double())
        module.proj.bias.copy_(bias.cpu().double())
    x = img.detach().cpu().double().requires_grad_()
    tokens, pos = module(x, true_shape=true_shape.cpu()) if many_ar else module(x)
    tokens.backward(grad_tokens.cpu().double())
    return tokens.detach(), pos, (x.grad, module.proj.weight.grad, module.proj.bias.grad)


def fastpatch_run(backend, img, weight, bias, patch, true_shape, grad_tokens):
    """Tokens, positions and grads (img, weight, bias) from :func:`fastpatch.patch_embed` on ``backend``."""
    leaves = [t.detach().clone().requires_grad_() for t in (img, weight, bias)]
    with fastpatch.use_backend(backend):
        tokens, pos = patch_embed(*leaves, patch, true_shape, many_ar=true_shape is not None)
    tokens.backward(grad_tokens)
    return tokens.detach(), pos, tuple(t.grad for t in leaves)


def check_against_oracle(case: Case, backend: str, dtype: torch.dtype, device: torch.device) -> None:
    img, weight, bias, true_shape = case.inputs(dtype, device)
    num_tokens = case.grid_h * case.grid_w
    grad_tokens = torch.randn(case.batch, num_tokens, case.embed_dim).to(device, dtype)
    tokens, pos, grads = fastpatch_run(backend, img, weight, bias, case.patch, true_shape, grad_tokens)
    ref_tokens, ref_pos, ref_grads = oracle(img, weight, bias, case.patch, true_shape, grad_tokens)

    assert tokens.dtype == dtype and tokens.shape == (case.batch, num_tokens, case.embed_dim)
    assert pos.dtype == torch.int64 and torch.equal(pos.cpu(), ref_pos)
    assert_close_to_reference(tokens, ref_tokens, dtype, what="tokens")
    for name, grad, ref in zip(("grad img", "grad weight", "grad bias"), grads, ref_grads):
        assert grad.dtype == dtype
        assert_close_to_reference(grad, ref, dtype, kind="backward", what=name)
    assert grads[0].stride() == img.stride() or case.layout == "sliced"


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_reference(case, dtype, backend, device):
    check_against_oracle(case, backend, dtype, device_for(backend, device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_grid_mixed_manyar(backend, device):
    check_against_oracle(ODD_GRID, backend, torch.float32, device_for(backend, device))


def test_positions_portrait_grid(device):
    """Portrait sample: grid of Wi/p rows x Hi/p columns; landscape: Hi/p x Wi/p."""
    case = Case("pos", 2, 16, 8, 2, 3, portrait=(False, True))
    img, weight, bias, true_shape = case.inputs(torch.float32, device)
    _, pos = patch_embed(img, weight, bias, 8, true_shape, many_ar=True)
    assert pos[0, :, 0].max() == 1 and pos[0, :, 1].max() == 2
    assert pos[1, :, 0].max() == 2 and pos[1, :, 1].max() == 1
    assert pos[1, :3].tolist() == [[0, 0], [0, 1], [1, 0]]


def test_image_without_grad_skips_image_gradient(device):
    case = SMALL_CASES[2]
    img, weight, bias, _ = case.inputs(torch.float32, device)
    weight.requires_grad_()
    tokens, _ = patch_embed(img, weight, bias, case.patch)
    tokens.sum().backward()
    assert img.grad is None and weight.grad is not None and bias.grad is None


def test_autocast_casts_like_conv2d(device):
    img, weight, bias = (t.to(device).requires_grad_() for t in (torch.randn(1, 3, 16, 16), torch.randn(8, 3, 8, 8),
                                                               torch.randn(8)))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        tokens, _ = patch_embed(img, weight, bias, 8)
    assert tokens.dtype == torch.bfloat16
    tokens.float().sum().backward()
    assert img.grad.dtype == weight.grad.dtype == bias.grad.dtype == torch.float32
    expected = reference.PatchEmbedDust3R(16, 8, 3, 8).double()
    expected.proj.weight.data, expected.proj.bias.data = weight.detach().cpu().double(), bias.detach().cpu().double()
    assert_close_to_reference(tokens, expected(img.detach().cpu().double())[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_before_the_dtype_check(backend, device):
    """Under autocast conv2d takes mixed floating dtypes (it casts them all first) and leaves float64
    alone; so does patch_embed."""
    on = device_for(backend, device)
    img, weight, bias = (t.to(on) for t in (torch.randn(1, 3, 16, 16), torch.randn(8, 3, 8, 8), torch.randn(8)))
    with fastpatch.use_backend(backend), torch.autocast(on.type, dtype=torch.bfloat16):
        tokens, _ = patch_embed(img.half(), weight, bias.bfloat16(), 8)
        assert tokens.dtype == torch.bfloat16
        with pytest.warns(RuntimeWarning, match="float64") if backend == "triton" else contextlib.nullcontext():
            tokens64, _ = patch_embed(img.double(), weight.double(), bias.double(), 8)
        assert tokens64.dtype == torch.float64
        with pytest.raises(TypeError, match="share a dtype"):
            patch_embed(img.double(), weight, bias, 8)
    expected = torch.nn.functional.conv2d(img.double(), weight.double(), bias.double(), stride=8)
    assert_close_to_reference(tokens, expected.flatten(2).transpose(1, 2), torch.bfloat16)
    assert relative_error(tokens64, expected.flatten(2).transpose(1, 2)) < 1e-12


@pytest.mark.parametrize("many_ar", [False, True], ids=["dust3r", "manyar"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, many_ar, device, monkeypatch):
    """B = 0 on both paths (the Triton one really taken): empty tokens and positions, an empty
    image gradient, zero weight and bias gradients."""
    on = device_for(backend, device)
    triton_calls = []
    original = patch_embed_triton._patch_embed_fwd
    monkeypatch.setattr(patch_embed_triton, "_patch_embed_fwd", lambda *args: triton_calls.append(1) or original(*args))
    img, weight, bias = (t.to(on).requires_grad_() for t in (torch.zeros(0, 3, 16, 32), torch.randn(8, 3, 16, 16),
                                                            torch.randn(8)))
    true_shape = torch.zeros(0, 2, dtype=torch.int64, device=on) if many_ar else None
    with fastpatch.use_backend(backend):
        tokens, pos = patch_embed(img, weight, bias, 16, true_shape, many_ar=many_ar)
    assert len(triton_calls) == (backend == "triton")
    assert tokens.shape == (0, 2, 8) and tokens.dtype == torch.float32
    assert pos.shape == (0, 2, 2) and pos.dtype == torch.int64
    tokens.sum().backward()
    assert img.grad.shape == img.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["PatchEmbedDust3R", "ManyAR_PatchEmbed"])
def test_modules_share_reference_keys_and_attributes(name):
    ours = fastpatch.get_patch_embed(name, (32, 48), 16, 24)
    ref = reference.get_patch_embed(name, (32, 48), 16, 24)
    assert type(ours).__name__ == name and isinstance(ours, type(ref))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert (ours.img_size, ours.patch_size, ours.grid_size, ours.num_patches, ours.flatten) == \
        ((32, 48), (16, 16), (2, 3), 6, True)
    assert isinstance(ours.proj, torch.nn.Conv2d) and isinstance(ours.norm, torch.nn.Identity)
    assert hasattr(ours, "position_getter")


def test_module_forward_matches_reference(device):
    ours = fastpatch.ManyAR_PatchEmbed((16, 32), 8, 3, 16)
    ref = reference.ManyAR_PatchEmbed((16, 32), 8, 3, 16)  # stays on CPU: a CUDA conv would use TF32
    ref.load_state_dict(ours.state_dict())
    ours.to(device)
    assert ours.embed_dim == 16
    img = torch.randn(2, 3, 16, 32)
    true_shape = torch.tensor([[32, 16], [16, 32]])
    tokens, pos = ours(img.to(device), true_shape.to(device))
    ref_tokens, ref_pos = ref(img, true_shape)
    assert torch.equal(pos.cpu(), ref_pos)
    assert_close_to_reference(tokens, ref_tokens.double())


def test_module_without_flatten_returns_feature_map(device):
    module = fastpatch.PatchEmbedDust3R(16, 8, 3, 16, flatten=False).to(device)
    img = torch.randn(1, 3, 16, 24, device=device)
    tokens, pos = module(img, true_shape=torch.tensor([[16, 24]]))
    expected = torch.nn.functional.conv2d(img.double(), module.proj.weight.double(), module.proj.bias.double(), stride=8)
    assert tokens.shape == (1, 16, 2, 3) and pos.shape == (1, 6, 2)
    assert_close_to_reference(tokens, expected)


def test_get_patch_embed_rejects_unknown_name():
    with pytest.raises(ValueError, match="ManyAR_PatchEmbed.*PatchEmbedDust3R"):
        fastpatch.get_patch_embed("__import__('os')", 224, 16, 8)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------
def _good():
    return torch.randn(2, 3, 16, 32), torch.randn(8, 3, 8, 8), torch.randn(8)


BAD_INPUTS = [
    ("H not a multiple", lambda i, w, b: (i[..., :15, :], w, b, 8, {}), ValueError, "multiple of the patch"),
    ("W not a multiple", lambda i, w, b: (i[..., :30], w, b, 8, {}), ValueError, "multiple of the patch"),
    ("channels", lambda i, w, b: (i[:, :2], w, b, 8, {}), ValueError, "channels"),
    ("3-D image", lambda i, w, b: (i[0], w, b, 8, {}), ValueError, "4-D"),
    ("integer image", lambda i, w, b: (i.long(), w, b, 8, {}), TypeError, "floating"),
    ("complex image", lambda i, w, b: (i.cfloat(), w.cfloat(), b.cfloat(), 8, {}), TypeError, "floating"),
    ("dtype mismatch", lambda i, w, b: (i.half(), w, b, 8, {}), TypeError, "share a dtype"),
    ("patch vs weight", lambda i, w, b: (i, w, b, 16, {}), ValueError, "does not match"),
    ("non-square patch", lambda i, w, b: (i, w, b, (8, 4), {}), ValueError, "square"),
    ("bias shape", lambda i, w, b: (i, w, b[:4], 8, {}), ValueError, "bias"),
    ("not a tensor", lambda i, w, b: (i.numpy(), w, b, 8, {}), TypeError, "torch.Tensor"),
    ("ManyAR taller than wide", lambda i, w, b: (i.transpose(-1, -2), w, b, 8,
                                                 dict(many_ar=True, true_shape=torch.tensor([[32, 16]] * 2))),
     ValueError, "landscape batch"),
    ("ManyAR no true_shape", lambda i, w, b: (i, w, b, 8, dict(many_ar=True)), TypeError, "true_shape"),
    ("true_shape shape", lambda i, w, b: (i, w, b, 8, dict(many_ar=True, true_shape=torch.tensor([[16, 32]]))),
     ValueError, r"\(2, 2\)"),
    ("true_shape float", lambda i, w, b: (i, w, b, 8, dict(many_ar=True, true_shape=torch.ones(2, 2))),
     TypeError, "integers"),
    ("true_shape values", lambda i, w, b: (i, w, b, 8, dict(many_ar=True, true_shape=torch.tensor([[16, 32], [16, 30]]))),
     ValueError, r"rows \[1\]"),
    ("devices", lambda i, w, b: (i, w.to("meta"), b, 8, {}), ValueError, "one device"),
]


@pytest.mark.parametrize("name,make,error,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_before_work(name, make, error, match):
    img, weight, bias, patch, kwargs = make(*_good())
    with pytest.raises(error, match=match):
        patch_embed(img, weight, bias, patch, **kwargs)


def test_float64_runs_the_torch_path_with_a_warning_under_triton(device):
    img, weight, bias = (t.double() for t in _good())
    expected = torch.nn.functional.conv2d(img, weight, bias, stride=8).flatten(2).transpose(1, 2)
    expected_pos = reference.PositionGetter()(2, 2, 4, "cpu")
    with pytest.warns(RuntimeWarning, match="float64; this patch embedding runs on the torch path"):
        tokens, pos = patch_embed(img.to(device), weight.to(device), bias.to(device), 8)
    assert tokens.dtype == torch.float64 and torch.equal(pos.cpu(), expected_pos)
    assert relative_error(tokens, expected) < 1e-12

"""qk-norm + RoPE2D attention (VGGT / π3): the eager reference against the spec, the public op's torch
path against the float64 oracle and the eager modules, its gradients, memory and bad inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastpatch
from bench.memory import peak_tensor_bytes
from fastpatch import reference_vggt as ref
from fastpatch.ops.qknorm_rope_attention_torch import qknorm_rope_attention_torch
from fastpatch.testing import TOLERANCES, assert_close_to_reference, relative_error

GRID = (3, 4, 5)  # height, width, special tokens: n = 17 tokens per frame


def _norms(head_dim, dtype=torch.float32, requires_grad=False):
    gen = torch.Generator().manual_seed(1)
    out = []
    for center, spread in ((1.0, 0.5), (0.0, 0.2), (1.0, 0.5), (0.0, 0.2)):
        w = (torch.randn(head_dim, generator=gen) * spread + center).to(dtype)
        out.append(w.requires_grad_(requires_grad))
    return out


def _norm_kwargs(norms):
    return dict(zip(("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias"), norms))


def _tokens(batch, heads, tokens, head_dim, dtype):
    return [torch.randn(batch, heads, tokens, head_dim).to(dtype) for _ in range(3)]


# ---------------------------------------------------------------------------------------------- reference
def test_grid_positions_follow_the_spec():
    pos = ref.grid_positions(2 * 17, 3, 4, 5)
    assert pos[:5].eq(0).all() and pos[17:22].eq(0).all()  # special tokens of both frames at (0, 0)
    assert pos[5].tolist() == [1, 1] and pos[8].tolist() == [1, 4] and pos[9].tolist() == [2, 1]
    assert pos[16].tolist() == [3, 4] and torch.equal(pos[17:], pos[:17])  # t mod n
    with pytest.raises(ValueError, match="whole frames"):
        ref.grid_positions(20, 3, 4, 5)


def test_rope_matches_the_spec_formula_and_is_identity_at_origin():
    """u'_i = u_i cos θ_i − u_{i+16} sin θ_i, θ_i = m 100^(−i/16); lanes 0..31 by y, 32..63 by x."""
    tokens = torch.randn(1, 2, 3, 64, dtype=torch.float64)
    pos = torch.tensor([[[0, 0], [2, 5], [37, 1]]])
    out = ref.RotaryPositionEmbedding2D()(tokens, pos)
    assert torch.equal(out[:, :, 0], tokens[:, :, 0])
    for axis in range(2):
        m = pos[0, 1, axis].double()
        for i in (0, 7, 15):
            theta = m * 100.0 ** (-i / 16)
            a, b = tokens[0, 1, 1, 32 * axis + i], tokens[0, 1, 1, 32 * axis + i + 16]
            expected = (a * math.cos(theta) - b * math.sin(theta), b * math.cos(theta) + a * math.sin(theta))
            got = (out[0, 1, 1, 32 * axis + i], out[0, 1, 1, 32 * axis + i + 16])
            assert all(abs(float(g - e)) < 1e-6 for g, e in zip(got, expected))


def test_reference_modules_have_the_spec_keys_and_defaults():
    block = ref.VGGTBlock(64, 4, qk_norm=True, init_values=0.01, rope=ref.RotaryPositionEmbedding2D())
    keys = set(block.state_dict())
    assert {"attn.qkv.weight", "attn.qkv.bias", "attn.q_norm.weight", "attn.q_norm.bias", "attn.k_norm.weight",
            "attn.k_norm.bias", "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "ls2.gamma",
            "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
            "mlp.fc2.weight", "mlp.fc2.bias"} == keys
    assert block.attn.q_norm.eps == 1e-5 and block.attn.q_norm.normalized_shape == (16,)
    assert block.norm1.eps == 1e-5 and isinstance(block.mlp.act, torch.nn.GELU) and block.mlp.act.approximate == "none"
    pi3 = ref.Pi3Block(64, 4, qk_norm=True, init_values=0.01, norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6))
    assert pi3.norm1.eps == 1e-6 and pi3.attn.k_norm.eps == 1e-5 and set(pi3.state_dict()) == keys
    assert pi3.attn.qkv.bias is not None  # spec §4: qkv bias True


def test_pi3_casts_normalised_qk_to_v_dtype_before_rope():
    """In bf16 π3 and VGGT-without-autocast are the "storage" mode; VGGT's fp32 LN output (autocast) is not."""
    torch.manual_seed(0)
    attn = ref.Pi3Attention(64, 2, qkv_bias=True, qk_norm=True, rope=ref.RotaryPositionEmbedding2D()).bfloat16()
    x = torch.randn(2, 34, 64).bfloat16()
    pos = ref.vggt_positions(2, 2, 3, 4)
    out = attn(x, xpos=pos)
    vggt = ref.VGGTAttention(64, 2, qk_norm=True, rope=attn.rope).bfloat16()
    vggt.load_state_dict(attn.state_dict())
    assert torch.equal(out, vggt(x, pos))


# ---------------------------------------------------------------------------------------------- torch path
@pytest.mark.parametrize("dtype, numerics", [(torch.float32, "float32"), (torch.float16, "float32"),
                                             (torch.bfloat16, "float32"), (torch.bfloat16, "storage"),
                                             (torch.float16, "storage"), (torch.float64, "float32")])
def test_torch_path_matches_the_oracle(dtype, numerics):
    q, k, v = _tokens(2, 3, 34, 64, dtype)
    norms = _norms(64)
    pos = ref.vggt_positions(2, 2, 3, 4)
    expected = ref.qknorm_rope_attention_reference(q, k, v, *norms, pos, numerics=numerics)
    with fastpatch.use_backend("torch"):
        by_grid = fastpatch.qknorm_rope_attention(q, k, v, **_norm_kwargs(norms), grid=GRID, numerics=numerics)
        by_pos = fastpatch.qknorm_rope_attention(q, k, v, **_norm_kwargs(norms), positions=pos, numerics=numerics)
    assert by_grid.dtype == dtype and by_grid.shape == q.shape
    assert by_grid.transpose(1, 2).is_contiguous()
    assert_close_to_reference(by_grid, expected, dtype, what="grid positions")
    assert torch.equal(by_grid, by_pos)


def test_storage_mode_rounds_where_pi3_does():
    """bf16 "storage" vs the "float32" oracle differ by more than bf16's own rounding: the mode matters."""
    q, k, v = _tokens(1, 2, 3 * 17, 64, torch.bfloat16)
    norms = _norms(64)
    pos = ref.vggt_positions(1, 3, 3, 4)
    storage = ref.qknorm_rope_attention_reference(q, k, v, *norms, pos, numerics="storage")
    fp32 = ref.qknorm_rope_attention_reference(q, k, v, *norms, pos, numerics="float32")
    assert relative_error(storage, fp32) > 1e-3


@pytest.mark.parametrize("cls, kwarg", [(ref.VGGTAttention, "pos"), (ref.Pi3Attention, "xpos")])
def test_torch_path_is_bit_exact_with_eager_bf16_modules(cls, kwarg):
    """bf16 weights, no autocast (storage numerics): the same roundings as the eager module, op by op."""
    torch.manual_seed(0)
    attn = cls(128, 2, qkv_bias=True, qk_norm=True, rope=ref.RotaryPositionEmbedding2D()).bfloat16().eval()
    x = torch.randn(2, 34, 128).bfloat16()
    pos = ref.vggt_positions(2, 2, 3, 4)
    expected = attn(x, **{kwarg: pos})
    qkv = attn.qkv(x).unflatten(-1, (3, 2, 64))
    with fastpatch.use_backend("torch"):
        out = fastpatch.qknorm_rope_attention(qkv, q_norm_weight=attn.q_norm.weight, q_norm_bias=attn.q_norm.bias,
                                              k_norm_weight=attn.k_norm.weight, k_norm_bias=attn.k_norm.bias,
                                              grid=GRID, numerics="storage")
    assert torch.equal(attn.proj(out.transpose(1, 2).reshape(2, 34, 128)), expected)


def test_gradcheck_float64():
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in _tokens(1, 3, 2 * 3, 8, torch.float64))
    norms = _norms(8, torch.float64, requires_grad=True)
    pos = ref.vggt_positions(1, 2, 1, 2, special=1)

    def fn(q, k, v, *norms):  # two head groups: the chunked backward is exercised
        return qknorm_rope_attention_torch(q, k, v, *norms, pos, 100.0, 1e-5, 0.3, "float32", chunk=2)
    assert torch.autograd.gradcheck(fn, (q, k, v, *norms), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_eager_autograd(dtype):
    """qkv-form gradients (q, k, v views of one buffer) and all four norm parameters, vs eager autograd."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 34, 3, 4, 32).to(dtype).requires_grad_()
    norms = _norms(32, torch.float32, requires_grad=True)
    grad = torch.randn(2, 4, 34, 32).to(dtype)
    with fastpatch.use_backend("torch"):
        out = fastpatch.qknorm_rope_attention(qkv, **_norm_kwargs(norms), grid=GRID)
    got = torch.autograd.grad(out, [qkv, *norms], grad)
    q, k, v = (t.transpose(1, 2).double() for t in qkv.detach().unbind(2))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    dnorms = [n.detach().double().requires_grad_() for n in norms]
    pos = ref.vggt_positions(1, 2, 3, 4)
    expected_out = ref.qknorm_rope_attention_reference(*leaves, *dnorms, pos)
    expected = torch.autograd.grad(expected_out, [*leaves, *dnorms], grad.double())
    expected_qkv = torch.stack([g.transpose(1, 2) for g in expected[:3]], dim=2)
    tol = TOLERANCES[dtype].backward
    for name, a, e in zip(("qkv", "q_w", "q_b", "k_w", "k_b"), got, (expected_qkv, *expected[3:])):
        assert relative_error(a, e) <= tol, name


def test_peak_memory_of_a_global_layer_is_at_most_half_of_eager():
    """Global attention over 2 VGGT frames at 518x392 (2082 tokens, 16 heads, Dh 64, fp32), CPU:
    the op's allocations vs eager's (LayerNorm, gather RoPE, SDPA)."""
    torch.manual_seed(0)
    hp, wp, frames = 28, 37, 2
    attn = ref.VGGTAttention(1024, 16, qk_norm=True, rope=ref.RotaryPositionEmbedding2D())
    q, k, v = _tokens(1, 16, frames * (5 + hp * wp), 64, torch.float32)
    pos = ref.vggt_positions(1, frames, hp, wp)
    norms = [attn.q_norm.weight, attn.q_norm.bias, attn.k_norm.weight, attn.k_norm.bias]

    def eager():
        qr, kr = attn.rope(attn.q_norm(q), pos), attn.rope(attn.k_norm(k), pos)
        return F.scaled_dot_product_attention(qr, kr, v)

    def fused():
        return fastpatch.qknorm_rope_attention(q, k, v, **_norm_kwargs(norms), grid=(hp, wp, 5))
    with torch.no_grad(), fastpatch.use_backend("torch"):
        eager_bytes, fused_bytes = peak_tensor_bytes(eager), peak_tensor_bytes(fused)
    assert fused_bytes <= 0.5 * eager_bytes, (fused_bytes, eager_bytes)


# ---------------------------------------------------------------------------------------------- bad inputs
def _call(**overrides):
    q, k, v = _tokens(1, 2, 17, 64, torch.float32)
    kwargs = dict(q=q, k=k, v=v, **_norm_kwargs(_norms(64)), grid=GRID)
    kwargs.update(overrides)
    with fastpatch.use_backend("torch"):
        return fastpatch.qknorm_rope_attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(grid=None), ValueError, "exactly one"),
    (dict(positions=torch.zeros(1, 17, 2, dtype=torch.long)), ValueError, "exactly one"),
    (dict(grid=(3, 5, 5)), ValueError, "whole frames"),
    (dict(grid=(3, 4.0, 5)), TypeError, "ints"),
    (dict(grid=None, positions=torch.zeros(1, 17, 2)), TypeError, "integer"),
    (dict(grid=None, positions=torch.zeros(1, 16, 2, dtype=torch.long)), ValueError, "shape"),
    (dict(q_norm_weight=torch.ones(32)), ValueError, r"\(64,\)"),
    (dict(k_norm_bias=torch.ones(64, dtype=torch.long)), TypeError, "floating"),
    (dict(q=torch.randn(1, 2, 17, 62)), ValueError, "same shape|one shape"),
    (dict(v=torch.randn(1, 2, 17, 64, dtype=torch.float64)), TypeError, "one dtype"),
    (dict(numerics="bf16"), ValueError, "numerics"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(k=None), ValueError, "qkv projection alone"),
    (dict(q="x"), TypeError, "torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_head_dim_not_divisible_by_4_raises():
    q = torch.randn(1, 2, 17, 6)
    with pytest.raises(ValueError, match="divisible by 4"):
        fastpatch.qknorm_rope_attention(q, q, q, **_norm_kwargs(_norms(6)), grid=GRID)


def test_none_norm_parameters_mean_identity_affine():
    q, k, v = _tokens(1, 2, 17, 64, torch.float32)
    ones, zeros = torch.ones(64), torch.zeros(64)
    with fastpatch.use_backend("torch"):
        a = fastpatch.qknorm_rope_attention(q, k, v, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None,
                                            k_norm_bias=None, grid=GRID)
        b = fastpatch.qknorm_rope_attention(q, k, v, **_norm_kwargs([ones, zeros, ones, zeros]), grid=GRID)
    assert torch.equal(a, b)

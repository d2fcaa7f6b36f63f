"""fastpatch.rope_attention: input validation, backend dispatch, and numerics of both paths against a
float64 oracle (RoPE2D from fastpatch.reference + explicit softmax attention).

The torch path runs on CPU at full size (it is fast on CPU); the Triton path, and every dispatch test
that asks for it, runs on the ``device`` fixture (through the interpreter on CPU at small sizes, or
compiled on CUDA) and skips, with the reason, while fastpatch.ops.rope_attention_triton is absent.
"""
import pytest
import torch

import fastpatch
from fastpatch import reference, rope_attention
from fastpatch.ops import rope_attention as rope_attention_module
from fastpatch.testing import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROPES = {  # id -> (rope_base, rope_f0)
    "rope100": (100.0, 1.0),
    "rope10000": (10000.0, 1.0),
    "rope100_f0": (100.0, 2.5),
    "no_rope": (None, 1.0),
}


def grid_positions(batch: int, tokens: int, width: int = 32) -> torch.Tensor:
    """(batch, tokens, 2) int64 raster positions of a grid ``width`` columns wide (y up to tokens / width)."""
    k = torch.arange(tokens)
    return torch.stack((k // width, k % width), dim=-1).expand(batch, tokens, 2).contiguous()


def oracle(q, k, v, q_pos, k_pos, rope_base, rope_f0, scale=None):
    """float64 softmax(rope(q) rope(k)^T * scale) v from the given (already rounded) inputs, on CPU."""
    q, k, v = (t.detach().cpu().double().requires_grad_(t.requires_grad) for t in (q, k, v))
    q_pos, k_pos = (None if p is None else p.cpu() for p in (q_pos, k_pos))
    if rope_base is not None:
        qr = reference.apply_rope2d(q, q_pos, rope_base, rope_f0)
        kr = reference.apply_rope2d(k, q_pos if k_pos is None else k_pos, rope_base, rope_f0)
    else:
        qr, kr = q, k
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = ((qr @ kr.transpose(-1, -2)) * scale).softmax(-1) @ v
    return out, (q, k, v)


def make_inputs(batch, heads, n_q, n_k, head_dim, dtype, layout="qkv", device="cpu"):
    """q (B, H, Nq, Dh) and k, v (B, H, Nk, Dh) as strided views, the way the modules produce them.

    ``layout="qkv"``: views of (B, N, 3, H, Dh) / (B, N, 2, H, Dh) projection buffers (self: one buffer).
    ``layout="contiguous"``: plain contiguous tensors.
    Values are drawn on CPU; the buffers move to ``device`` before the views are taken (strides kept).
    """
    randn = lambda *shape: torch.randn(*shape, dtype=dtype).to(device)  # noqa: E731
    if layout == "contiguous":
        q = randn(batch, heads, n_q, head_dim)
        k = randn(batch, heads, n_k, head_dim)
        v = randn(batch, heads, n_k, head_dim)
        tensors = (q, k, v)
    elif n_q == n_k:
        qkv = randn(batch, n_q, 3, heads, head_dim)
        tensors = tuple(t.transpose(1, 2) for t in qkv.unbind(2))
    else:
        q = randn(batch, n_q, heads, head_dim).transpose(1, 2)
        kv = randn(batch, n_k, 2, heads, head_dim)
        tensors = (q,) + tuple(t.transpose(1, 2) for t in kv.unbind(2))
    return tensors


def as_leaves(tensors):
    """Strided views turned into leaves requiring grad (``detach`` keeps the strides)."""
    return tuple(t.detach().requires_grad_() for t in tensors)


def check_against_oracle(q, k, v, q_pos, k_pos, rope_base, rope_f0, backward: bool):
    out = rope_attention(q, k, v, q_pos, k_pos, rope_base=rope_base, rope_f0=rope_f0)
    assert out.shape == q.shape[:3] + (v.shape[-1],)
    assert out.dtype == q.dtype
    expected, leaves64 = oracle(q, k, v, q_pos, k_pos, rope_base, rope_f0)
    assert_close_to_reference(out, expected, q.dtype, what="output")
    if backward:
        grad_out = torch.randn_like(expected)
        grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.device, out.dtype))
        expected_grads = torch.autograd.grad(expected, leaves64, grad_out)
        for name, g, e in zip("qkv", grads, expected_grads):
            assert g.shape == e.shape
            assert_close_to_reference(g, e, q.dtype, kind="backward", what=f"grad {name}")


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------
def _valid():
    q, k, v = make_inputs(2, 2, 5, 5, 8, torch.float32, layout="contiguous")
    return dict(q=q, k=k, v=v, q_pos=grid_positions(2, 5), k_pos=None)


BAD_INPUTS = {
    "q_not_tensor": (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    "q_3d": (dict(q=torch.randn(2, 5, 8)), ValueError, "q must be 4-D"),
    "v_5d": (dict(v=torch.randn(2, 2, 5, 8, 1)), ValueError, "v must be 4-D"),
    "int_tokens": (dict(q=torch.ones(2, 2, 5, 8, dtype=torch.int64)), TypeError, "floating dtype"),
    "mixed_dtypes": (dict(k=torch.randn(2, 2, 5, 8, dtype=torch.float64)), TypeError, "share one dtype"),
    "batch_mismatch": (dict(k=torch.randn(1, 2, 5, 8), v=torch.randn(1, 2, 5, 8)), ValueError, "agree on batch"),
    "head_mismatch": (dict(k=torch.randn(2, 3, 5, 8), v=torch.randn(2, 3, 5, 8)), ValueError, "agree on batch"),
    "head_dim_mismatch": (dict(k=torch.randn(2, 2, 5, 4), v=torch.randn(2, 2, 5, 4)), ValueError, "agree on batch"),
    "kv_mismatch": (dict(v=torch.randn(2, 2, 6, 8)), ValueError, "k and v must have the same shape"),
    "head_dim_not_mult_4": (dict(q=torch.randn(2, 2, 5, 6), k=torch.randn(2, 2, 5, 6), v=torch.randn(2, 2, 5, 6)),
                            ValueError, "divisible by 4"),
    "pos_float": (dict(q_pos=grid_positions(2, 5).float()), TypeError, "integer dtype"),
    "pos_bool": (dict(q_pos=torch.zeros(2, 5, 2, dtype=torch.bool)), TypeError, "integer dtype"),
    "pos_not_tensor": (dict(q_pos=[[0, 0]]), TypeError, "q_pos must be a torch.Tensor"),
    "pos_wrong_last_dim": (dict(q_pos=torch.zeros(2, 5, 3, dtype=torch.int64)), ValueError, "(B, N, 2)"),
    "pos_2d": (dict(q_pos=torch.zeros(5, 2, dtype=torch.int64)), ValueError, "(B, N, 2)"),
    "pos_count": (dict(q_pos=grid_positions(2, 6)), ValueError, "one (y, x) pair per token"),
    "pos_batch": (dict(q_pos=grid_positions(1, 5)), ValueError, "one (y, x) pair per token"),
    "k_pos_count": (dict(k_pos=grid_positions(2, 4)), ValueError, "k_pos has shape"),
    "missing_k_pos_cross": (dict(k=torch.randn(2, 2, 7, 8), v=torch.randn(2, 2, 7, 8)), ValueError,
                            "k_pos is required"),
    "missing_q_pos": (dict(q_pos=None), ValueError, "q_pos is required"),
    "mixed_devices": (dict(q_pos=grid_positions(2, 5).to("meta")), ValueError, "one device"),
    "bad_dropout": (dict(dropout_p=1.0), ValueError, "dropout_p"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_before_any_work(case, monkeypatch):
    changes, error, message = BAD_INPUTS[case]
    args = _valid()
    args.update(changes)

    def no_work(*_, **__):
        raise AssertionError("validation let a bad input through to an implementation")

    monkeypatch.setattr(rope_attention_module, "rope_attention_torch", no_work)
    with fastpatch.use_backend("torch"), pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        rope_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("q_pos"), args.pop("k_pos"), **args)


def test_plain_attention_needs_no_positions():
    q, k, v = make_inputs(2, 2, 5, 7, 6, torch.float32, layout="contiguous")  # Dh=6: fine without RoPE
    with fastpatch.use_backend("torch"):
        out = rope_attention(q, k, v, None, rope_base=None)
    expected, _ = oracle(q, k, v, None, None, None, 1.0)
    assert_close_to_reference(out, expected, torch.float32)


# ---------------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_triton_op(monkeypatch):
    """Replace the Triton op fastpatch.rope_attention calls by a recorder returning (B, Nq, H, Dh) zeros."""
    calls = []

    def rope_attention_triton(q, k, v, q_pos, k_pos, rope_base, rope_f0, scale):
        calls.append(dict(q_pos=q_pos, k_pos=k_pos, rope_base=rope_base, rope_f0=rope_f0, scale=scale))
        b, h, n, d = q.shape
        return q.new_zeros(b, n, h, d)

    monkeypatch.setattr(rope_attention_module, "_triton_op", lambda: rope_attention_triton)
    return calls


def test_auto_dispatches_to_triton_on_the_kernel_device(fake_triton_op, device):
    q, k, v = make_inputs(2, 2, 5, 5, 32, torch.float32, device=device)
    pos = grid_positions(2, 5).to(device)
    with fastpatch.use_backend("auto"):
        out = rope_attention(q, k, v, pos, rope_base=10000.0, rope_f0=2.0)
    (call,) = fake_triton_op
    assert call["k_pos"] is pos and call["q_pos"] is pos  # k_pos=None means q_pos
    assert call["rope_base"] == 10000.0 and call["rope_f0"] == 2.0 and call["scale"] == 32 ** -0.5
    assert out.shape == (2, 2, 5, 32) and out.transpose(1, 2).is_contiguous()


def test_forced_torch_backend_skips_triton(fake_triton_op):
    q, k, v = make_inputs(1, 2, 5, 5, 8, torch.float32)
    with fastpatch.use_backend("torch"):
        rope_attention(q, k, v, grid_positions(1, 5))
    assert fake_triton_op == []


def test_dropout_falls_back_to_torch_with_a_warning(fake_triton_op, device):
    q, k, v = make_inputs(1, 2, 5, 5, 32, torch.float32, device=device)
    with fastpatch.use_backend("triton"), pytest.warns(RuntimeWarning, match="no dropout"):
        out = rope_attention(q, k, v, grid_positions(1, 5).to(device), dropout_p=0.5)
    assert fake_triton_op == [] and out.shape == (1, 2, 5, 32)


@pytest.mark.parametrize("head_dim, dtype", [(16, torch.float32), (64, torch.float64)])
def test_calls_the_kernels_cannot_run_fall_back_to_torch_with_a_warning(fake_triton_op, head_dim, dtype, device):
    q, k, v = make_inputs(1, 2, 5, 5, head_dim, dtype, device=device)
    pos = grid_positions(1, 5).to(device)
    with fastpatch.use_backend("triton"), pytest.warns(RuntimeWarning, match="torch path"):
        out = rope_attention(q, k, v, pos)
    assert fake_triton_op == []
    assert_close_to_reference(out, oracle(q, k, v, pos, None, 100.0, 1.0)[0], torch.float32)


def test_int32_positions_reach_the_kernels_as_int64(fake_triton_op, device):
    q, k, v = make_inputs(1, 2, 5, 5, 32, torch.float32, device=device)
    with fastpatch.use_backend("triton"):
        rope_attention(q, k, v, grid_positions(1, 5).int().to(device))
    assert fake_triton_op[0]["q_pos"].dtype == torch.int64 and fake_triton_op[0]["k_pos"].dtype == torch.int64


# ---------------------------------------------------------------------------------------------------
# torch path numerics
# ---------------------------------------------------------------------------------------------------
SEQUENCES = {"n1": (1, 1), "n37": (37, 37), "n196": (196, 196), "n197": (197, 197), "cross37x196": (37, 196)}


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("seq", list(SEQUENCES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_forward_matches_float64(dtype, seq, rope):
    n_q, n_k = SEQUENCES[seq]
    q, k, v = make_inputs(2, 2, n_q, n_k, 64, dtype)
    q_pos = grid_positions(2, n_q)
    k_pos = None if n_q == n_k else grid_positions(2, n_k, width=14).flip(1)  # other grid, other order
    with fastpatch.use_backend("torch"):
        check_against_oracle(q, k, v, q_pos, k_pos, *ROPES[rope], backward=False)


@pytest.mark.parametrize("seq", ["n37", "n197", "cross37x196"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_gradients_match_float64(dtype, seq):
    n_q, n_k = SEQUENCES[seq]
    q, k, v = as_leaves(make_inputs(2, 2, n_q, n_k, 64, dtype))
    k_pos = None if n_q == n_k else grid_positions(2, n_k, width=14)
    with fastpatch.use_backend("torch"):
        check_against_oracle(q, k, v, grid_positions(2, n_q), k_pos, 100.0, 1.0, backward=True)


@pytest.mark.parametrize("layout", ["qkv", "contiguous"])
def test_torch_path_layouts_and_custom_scale(layout):
    q, k, v = make_inputs(2, 3, 50, 50, 32, torch.float32, layout=layout)
    pos = grid_positions(2, 50, width=7)
    with fastpatch.use_backend("torch"):
        out = rope_attention(q, k, v, pos, scale=0.3)
    expected, _ = oracle(q, k, v, pos, None, 100.0, 1.0, scale=0.3)
    assert_close_to_reference(out, expected, torch.float32)
    assert out.transpose(1, 2).is_contiguous(), "heads should merge without a copy"


def test_torch_rotation_has_double_backward():
    from fastpatch.ops.rope_torch import rope_cos_sin, rotate_rope

    x = torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_cos_sin(grid_positions(1, 9, width=3), 8, 100.0, 1.0, torch.float64)
    assert torch.autograd.gradgradcheck(lambda t: rotate_rope(t, cos, sin), (x,))


def test_torch_path_survives_inference_mode_then_autograd():
    """The cached frequency table made under inference_mode must not poison a later autograd call."""
    q, k, v = as_leaves(make_inputs(1, 2, 11, 11, 12, torch.float32))
    pos = grid_positions(1, 11, width=4)
    with fastpatch.use_backend("torch"):
        with torch.inference_mode():
            rope_attention(q.detach(), k.detach(), v.detach(), pos, rope_f0=0.75)
        rope_attention(q, k, v, pos, rope_f0=0.75).sum().backward()
    assert q.grad is not None


# ---------------------------------------------------------------------------------------------------
# Triton path (interpreter on CPU, compiled with FASTPATCH_TEST_COMPILED=1)
# ---------------------------------------------------------------------------------------------------
TRITON_CASES = {  # id -> (Nq, Nk, head_dim, rope)
    "self37_dh64": (37, 37, 64, "rope100"),
    "self64_dh32_base10000": (64, 64, 32, "rope10000"),
    "cross37x50_f0": (37, 50, 32, "rope100_f0"),
    "self1": (1, 1, 32, "rope100"),
    "self197_dh128": (197, 197, 128, "rope100"),
    "plain": (23, 23, 32, "no_rope"),
}


@pytest.mark.parametrize("case", list(TRITON_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_path_forward_matches_float64(dtype, case, device):
    n_q, n_k, head_dim, rope = TRITON_CASES[case]
    q, k, v = make_inputs(1, 2, n_q, n_k, head_dim, dtype, device=device)
    q_pos = grid_positions(1, n_q, width=8).to(device)
    k_pos = None if n_q == n_k else grid_positions(1, n_k, width=5).to(device)
    with fastpatch.use_backend("triton"):
        check_against_oracle(q, k, v, q_pos, k_pos, *ROPES[rope], backward=False)


@pytest.mark.parametrize("case", ["self37_dh64", "cross37x50_f0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_path_gradients_match_float64(dtype, case, device):
    n_q, n_k, head_dim, rope = TRITON_CASES[case]
    q, k, v = as_leaves(make_inputs(1, 2, n_q, n_k, head_dim, dtype, device=device))
    q_pos = grid_positions(1, n_q, width=8).to(device)
    k_pos = None if n_q == n_k else grid_positions(1, n_k, width=5).to(device)
    with fastpatch.use_backend("triton"):
        check_against_oracle(q, k, v, q_pos, k_pos, *ROPES[rope], backward=True)

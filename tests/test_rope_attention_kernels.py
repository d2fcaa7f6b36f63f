"""Triton RoPE flash attention (forward + backward) against a float64 reference written from the spec.

Runs on the ``device`` fixture: through the Triton interpreter on CPU, or compiled on CUDA with
FASTPATCH_TEST_COMPILED=1 (see conftest.py); the float64 reference is computed on CPU. Sizes are
kept small (N <= 197, 1-2 heads) because the interpreter runs one program at a time.
"""
import pytest
import torch

from fastpatch.launchers.rope_attention import rope_attention_forward
from fastpatch.ops.rope_attention_triton import rope_attention_triton
from fastpatch.testing import assert_close_to_reference


def rope2d_float64(x: torch.Tensor, pos: torch.Tensor, base: float, f0: float) -> torch.Tensor:
    """Spec section 3 in float64: x (B, H, N, Dh), pos (B, N, 2) (y, x) -> rotated x."""
    quarter = x.shape[-1] // 4
    freq = f0 * base ** (-torch.arange(quarter, dtype=torch.float64, device=x.device) / quarter)
    halves = []
    for half, coord in zip(x.split(2 * quarter, dim=-1), (pos[..., 0], pos[..., 1])):
        angle = coord.to(torch.float64)[:, None, :, None] * freq  # (B, 1, N, Q)
        first, second = half.split(quarter, dim=-1)
        halves += [first * angle.cos() - second * angle.sin(), second * angle.cos() + first * angle.sin()]
    return torch.cat(halves, dim=-1)


def attention_float64(q, k, v, q_pos, k_pos, base, f0, scale):
    """softmax(scale RoPE(q) RoPE(k)^T) v in float64 -> (B, Nq, H, Dh), on q's device."""
    q, k, v = q.double(), k.double(), v.double()
    if base is not None:
        q_pos, k_pos = q_pos.to(q.device), k_pos.to(q.device)
        q, k = rope2d_float64(q, q_pos, base, f0), rope2d_float64(k, k_pos, base, f0)
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    return (probs @ v).transpose(1, 2)


def grid_positions(batch: int, rows: int, cols: int) -> torch.Tensor:
    """(B, rows*cols, 2) int64 raster-order (y, x) positions (spec section 2)."""
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([y.flatten(), x.flatten()], dim=-1).expand(batch, -1, -1)


def random_positions(batch: int, n: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, n, 2))


def fused_qkv_views(batch, n, heads, head_dim, dtype, device):
    """q, k, v (B, H, N, Dh) as non-contiguous views of one (B, N, 3, H, Dh) projection output."""
    qkv = torch.randn(batch, n, 3, heads, head_dim, device=device).to(dtype)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def check(q, k, v, q_pos, k_pos, base, f0, k_rotation, backward=True):
    """Compare the Triton op (forward and, if asked, q/k/v gradients) with the float64 reference."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5
    q, k, v = (x.detach().requires_grad_(backward) for x in (q, k, v))
    out = rope_attention_triton(q, k, v, q_pos, k_pos, base, f0, scale, k_rotation=k_rotation)
    assert out.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3]) and out.is_contiguous()
    assert out.dtype == dtype
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_(backward) for x in (q, k, v))  # reference on CPU
    expected = attention_float64(q64, k64, v64, q_pos, k_pos, base, f0, scale)
    assert_close_to_reference(out, expected, dtype, what="out")
    if not backward:
        return
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad_out.cpu().double())
    for name, grad, expected_grad in zip("qkv", grads, expected_grads):
        assert grad.dtype == dtype and grad.shape == expected_grad.shape
        assert_close_to_reference(grad, expected_grad, dtype, kind="backward", what=f"d{name}")


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
K_ROTATIONS = ["in_loop", "pre_rotated"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k_rotation", K_ROTATIONS)
def test_self_attention_fused_qkv_grid(dtype, k_rotation, device):
    """Self-attention on a 14x14 grid (N = 196, DUSt3R 224x224), q/k/v read from a fused qkv buffer."""
    q, k, v = fused_qkv_views(1, 196, 2, 64, dtype, device)
    pos = grid_positions(1, 14, 14).to(device)
    check(q, k, v, pos, pos, 100.0, 1.0, k_rotation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k_rotation", K_ROTATIONS)
def test_cross_attention_random_positions(dtype, k_rotation, device):
    """Cross-attention Nq = 37 != Nk = 197 (tails on both axes), random positions up to 63, F0 != 1."""
    q = torch.randn(2, 1, 37, 64, device=device).to(dtype)
    k, v = torch.randn(2, 2, 1, 197, 64, device=device).to(dtype)
    check(q, k, v, random_positions(2, 37).to(device), random_positions(2, 197).to(device), 10000.0, 1.7,
          k_rotation)


@pytest.mark.parametrize("head_dim", [32, 128])
@pytest.mark.parametrize("k_rotation", K_ROTATIONS)
def test_head_dims_odd_grid(head_dim, k_rotation, device):
    """Head dims 32 and 128; 37 tokens drawn from a 37x23 grid (all 851 would be slow in the interpreter)."""
    q, k, v = fused_qkv_views(1, 37, 1, head_dim, torch.float16, device)
    pos = grid_positions(1, 37, 23)[:, torch.randperm(37 * 23)[:37]].to(device)
    check(q, k, v, pos, pos, 100.0, 1.0, k_rotation)


def test_head_dim_128_cross_fp32_grid(device):
    """Head dim 128 in fp32, cross-attention between a 5x7 and a 4x6 grid."""
    q = torch.randn(1, 2, 35, 128, device=device)
    k, v = torch.randn(2, 1, 2, 24, 128, device=device)
    check(q, k, v, grid_positions(1, 5, 7).to(device), grid_positions(1, 4, 6).to(device), 100.0, 1.0, "in_loop")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_rope(dtype, device):
    """rope_base=None: plain flash attention, positions ignored (None)."""
    q, k, v = fused_qkv_views(2, 37, 2, 64, dtype, device)
    check(q, k, v, None, None, None, 1.0, None)


@pytest.mark.parametrize("n", [1, 197])
def test_sequence_tails(n, device):
    """N = 1 (a single token) and N = 197 (one past a multiple of 64) in bf16."""
    q, k, v = fused_qkv_views(1, n, 1, 32, torch.bfloat16, device)
    pos = random_positions(1, n).to(device)
    check(q, k, v, pos, pos, 100.0, 1.0, "in_loop")


def test_log_sum_exp(device):
    """The saved lse is the natural-log log-sum-exp of the scaled, rotated scores, (B, H, Nq) fp32."""
    q, k, v = torch.randn(3, 1, 2, 37, 32, device=device)
    pos = random_positions(1, 37).to(device)
    _, lse = rope_attention_forward(q, k, v, pos, pos, 100.0, 1.0, 0.25)
    q64, k64, pos64 = q.cpu().double(), k.cpu().double(), pos.cpu()  # reference on CPU
    q64, k64 = rope2d_float64(q64, pos64, 100.0, 1.0), rope2d_float64(k64, pos64, 100.0, 1.0)
    expected = torch.logsumexp(q64 @ k64.transpose(-1, -2) * 0.25, dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 37)
    assert_close_to_reference(lse, expected, torch.float32, what="lse")


def test_strategies_agree_and_backward_deterministic(device):
    """Both K-rotation strategies give the same fp32 result; the backward is bitwise reproducible."""
    q, k, v = fused_qkv_views(1, 70, 1, 64, torch.float32, device)
    pos = random_positions(1, 70).to(device)
    outs = [rope_attention_triton(q, k, v, pos, pos, 100.0, 1.0, 0.125, k_rotation=r) for r in K_ROTATIONS]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    grad_out = torch.randn(1, 70, 1, 64, device=device)
    runs = [torch.autograd.grad(rope_attention_triton(q, k, v, pos, pos, 100.0, 1.0, 0.125), (q, k, v), grad_out)
            for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_unsupported_head_dim(device):
    q = torch.randn(1, 1, 4, 48, device=device)
    with pytest.raises(ValueError, match="head dims"):
        rope_attention_forward(q, q, q, None, None, None, 1.0, 1.0)


def test_custom_op_registration(device):
    """torch.library.opcheck: schema, fake tensors (strides included), autograd registration."""
    q, k, v = (x.requires_grad_() for x in torch.randn(3, 1, 1, 16, 32, device=device))
    pos = random_positions(1, 16).to(device)
    torch.library.opcheck(torch.ops.fastpatch.rope_attention_fwd.default,
                          (q, k, v, pos, pos, 100.0, 1.0, 0.2, "in_loop"))


def test_torch_compile_fullgraph(device):
    """The custom ops trace under torch.compile with no graph break, forward and backward."""
    q, k, v = (x.requires_grad_() for x in torch.randn(3, 1, 1, 20, 32, device=device))
    pos = random_positions(1, 20).to(device)

    def attention(q, k, v):
        return rope_attention_triton(q, k, v, pos, pos, 100.0, 1.0, 0.2).sum()

    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attention(q, k, v))
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for grad, expected in zip(grads, torch.autograd.grad(attention(q, k, v), (q, k, v))):
        torch.testing.assert_close(grad, expected)

"""The Triton qk-norm + RoPE2D attention kernels (interpreter on CPU, or CUDA in compiled mode) against
the float64 oracle: forward and every gradient, both numerics modes, grid and tensor positions, tails."""
import pytest
import torch

import fastpatch
from fastpatch import reference_vggt as ref
from fastpatch.testing import TOLERANCES, relative_error

NORMS = ("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias")


def _inputs(batch, heads, tokens, head_dim, dtype, device):
    gen = torch.Generator().manual_seed(3)
    tokens_ = [torch.randn(batch, heads, tokens, head_dim, generator=gen).to(dtype) for _ in range(3)]
    norms = [(torch.randn(head_dim, generator=gen) * s + c) for c, s in ((1, 0.5), (0, 0.2), (1, 0.5), (0, 0.2))]
    on_device = [t.to(device).requires_grad_() for t in tokens_ + norms]
    return tokens_, norms, on_device


def _check(dtype, numerics, device, batch, heads, grid, frames, use_grid, backward=True):
    height, width, special = grid
    tokens = frames * (special + height * width)
    cpu_tokens, cpu_norms, leaves = _inputs(batch, heads, tokens, 64, dtype, device)
    pos = ref.vggt_positions(batch, frames, height, width, special)
    where = dict(grid=grid) if use_grid else dict(positions=pos.to(device))
    with fastpatch.use_backend("triton"):
        out = fastpatch.qknorm_rope_attention(*leaves[:3], **dict(zip(NORMS, leaves[3:])), numerics=numerics,
                                              **where)
    expected = ref.qknorm_rope_attention_reference(*cpu_tokens, *cpu_norms, pos, numerics=numerics)
    tol = TOLERANCES[dtype]
    assert out.dtype == dtype and out.shape == (batch, heads, tokens, 64)
    assert relative_error(out.cpu(), expected) <= tol.forward
    if not backward:
        return
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    got = torch.autograd.grad(out, leaves, grad.to(device))
    oracle_leaves = [t.double().requires_grad_() for t in cpu_tokens + cpu_norms]
    oracle = ref.qknorm_rope_attention_reference(*oracle_leaves[:3], *oracle_leaves[3:], pos)  # fp32 function
    wanted = torch.autograd.grad(oracle, oracle_leaves, grad.double())
    for name, a, e in zip(("dq", "dk", "dv") + NORMS, got, wanted):
        assert relative_error(a.cpu(), e) <= tol.backward, name


@pytest.mark.parametrize("dtype, numerics", [(torch.float32, "float32"), (torch.float16, "float32"),
                                             (torch.bfloat16, "float32"), (torch.bfloat16, "storage"),
                                             (torch.float16, "storage")])
def test_forward_and_gradients_match_the_oracle(dtype, numerics, device):
    _check(dtype, numerics, device, batch=1, heads=2, grid=(3, 4, 5), frames=2, use_grid=True)


def test_tensor_positions_batches_and_tails(device):
    """Tensor positions, batch 2, and a sequence (3 frames of 5 + 5x7 = 120 tokens) that is no multiple of
    the 64-row tiles."""
    _check(torch.float32, "float32", device, batch=2, heads=1, grid=(5, 7, 5), frames=3, use_grid=False)


def test_grid_positions_past_one_tile_forward(device):
    """One frame of 5 + 9x13 tokens (122; grid rows past the first tiles), forward only."""
    _check(torch.float16, "float32", device, batch=1, heads=1, grid=(9, 13, 5), frames=1, use_grid=True,
           backward=False)


def test_grid_and_positions_agree_exactly(device):
    cpu_tokens, cpu_norms, leaves = _inputs(1, 2, 2 * 17, 64, torch.float16, device)
    kwargs = dict(zip(NORMS, leaves[3:]))
    pos = ref.vggt_positions(1, 2, 3, 4).to(device)
    with torch.no_grad(), fastpatch.use_backend("triton"):
        a = fastpatch.qknorm_rope_attention(*leaves[:3], grid=(3, 4, 5), **kwargs)
        b = fastpatch.qknorm_rope_attention(*leaves[:3], positions=pos, **kwargs)
    assert torch.equal(a, b)


def test_unsupported_inputs_fall_back_to_torch_with_one_warning(device):
    """float64 has no Triton kernel: the torch path runs, with a RuntimeWarning saying why."""
    q = torch.randn(1, 2, 17, 64, dtype=torch.float64, device=device)
    norms = dict(zip(NORMS, [torch.ones(64, device=device), torch.zeros(64, device=device)] * 2))
    with fastpatch.use_backend("triton"), pytest.warns(RuntimeWarning, match="float16/bfloat16/float32") as record:
        out = fastpatch.qknorm_rope_attention(q, q, q, grid=(3, 4, 5), **norms)
    assert len(record) == 1 and out.dtype == torch.float64

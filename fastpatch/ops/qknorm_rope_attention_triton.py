"""Autograd layer of the Triton qk-norm + RoPE2D attention: ``torch.library`` custom ops + entry point.

``fastpatch::qknorm_rope_attention_fwd`` / ``_bwd`` wrap :mod:`fastpatch.launchers.qknorm_rope_attention`
as opaque custom ops with fake implementations (``torch.compile`` traces them without graph breaks);
the backward is registered with ``register_autograd`` and returns gradients for q, k, v and the four
LayerNorm parameters. Calls nothing records (inference) run the launcher directly
(:func:`fastpatch.ops.direct_launch.launch_directly`).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..launchers.qknorm_rope_attention import qknorm_rope_attention_backward, qknorm_rope_attention_forward
from .direct_launch import launch_directly

__all__ = ["qknorm_rope_attention_triton"]


def _grid(grid: Optional[List[int]]):
    return None if grid is None else tuple(grid)


@torch.library.custom_op("fastpatch::qknorm_rope_attention_fwd", mutates_args=())
def qknorm_rope_attention_fwd(q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor, q_bias: Tensor, k_weight: Tensor,
                              k_bias: Tensor, positions: Optional[Tensor], grid: Optional[List[int]],
                              rope_base: float, eps: float, scale: float, numerics: str) -> Tuple[Tensor, Tensor]:
    """(out (B, N, H, Dh) contiguous, lse (B, H, N) fp32) for q, k, v (B, H, N, Dh)."""
    return qknorm_rope_attention_forward(q, k, v, q_weight, q_bias, k_weight, k_bias, positions, _grid(grid),
                                         rope_base, eps, scale, numerics)


@qknorm_rope_attention_fwd.register_fake
def _fwd_fake(q, k, v, q_weight, q_bias, k_weight, k_bias, positions, grid, rope_base, eps, scale, numerics):
    batch, heads, tokens, head_dim = q.shape
    return q.new_empty((batch, tokens, heads, head_dim)), q.new_empty((batch, heads, tokens), dtype=torch.float32)


def _token_major_strides(shape) -> Tuple[int, int, int, int]:
    _, heads, tokens, head_dim = shape
    return (tokens * heads * head_dim, head_dim, heads * head_dim, 1)


@torch.library.custom_op("fastpatch::qknorm_rope_attention_bwd", mutates_args=())
def qknorm_rope_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor, q_bias: Tensor,
                              k_weight: Tensor, k_bias: Tensor, out: Tensor, lse: Tensor, positions: Optional[Tensor],
                              grid: Optional[List[int]], rope_base: float, eps: float, scale: float,
                              numerics: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv token-major (B, H, N, Dh); dq_weight, dq_bias, dk_weight, dk_bias (Dh,))."""
    return qknorm_rope_attention_backward(grad_out, q, k, v, q_weight, q_bias, k_weight, k_bias, out, lse, positions,
                                          _grid(grid), rope_base, eps, scale, numerics)


@qknorm_rope_attention_bwd.register_fake
def _bwd_fake(grad_out, q, k, v, q_weight, q_bias, k_weight, k_bias, out, lse, positions, grid, rope_base, eps, scale,
              numerics):
    tokens = tuple(x.new_empty_strided(x.shape, _token_major_strides(x.shape)) for x in (q, k, v))
    return tokens + tuple(torch.empty_like(w) for w in (q_weight, q_bias, k_weight, k_bias))


def _setup_context(ctx, inputs, output):
    q, k, v, q_weight, q_bias, k_weight, k_bias, positions, grid, rope_base, eps, scale, numerics = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, q_weight, q_bias, k_weight, k_bias, out, lse, positions)
    ctx.args = (grid, rope_base, eps, scale, numerics)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, q_weight, q_bias, k_weight, k_bias, out, lse, positions = ctx.saved_tensors
    grads = qknorm_rope_attention_bwd(grad_out, q, k, v, q_weight, q_bias, k_weight, k_bias, out, lse, positions,
                                      *ctx.args)
    return (*grads, None, None, None, None, None, None)


qknorm_rope_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def qknorm_rope_attention_triton(q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor, q_bias: Tensor,
                                 k_weight: Tensor, k_bias: Tensor, positions: Optional[Tensor],
                                 grid: Optional[Tuple[int, int, int]], rope_base: float, eps: float, scale: float,
                                 numerics: str) -> Tensor:
    """``softmax(scale RoPE(LN_q(q)) RoPE(LN_k(k))^T) v`` on the Triton kernels.

    Args:
        q, k, v: (B, H, N, Dh), one dtype (fp16/bf16/fp32), any strides, Dh in {32, 64, 128}.
        q_weight, q_bias, k_weight, k_bias: (Dh,) LayerNorm parameters.
        positions: (B or 1, N, 2) int64, or None with ``grid`` = (height, width, special).
        rope_base, eps, scale, numerics: as :func:`fastpatch.qknorm_rope_attention`.

    Returns:
        (B, N, H, Dh) contiguous in q's dtype; differentiable wrt q, k, v and the four parameters.
    """
    grid = None if grid is None else list(grid)
    if launch_directly(q, k, v, q_weight, q_bias, k_weight, k_bias, positions):
        out, _ = qknorm_rope_attention_forward(q, k, v, q_weight, q_bias, k_weight, k_bias, positions, _grid(grid),
                                               rope_base, eps, scale, numerics)
    else:
        out, _ = qknorm_rope_attention_fwd(q, k, v, q_weight, q_bias, k_weight, k_bias, positions, grid, rope_base,
                                           eps, scale, numerics)
    return out

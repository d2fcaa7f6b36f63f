"""Autograd layer of the Triton RoPE flash attention: ``torch.library`` custom ops + entry point.

``fastpatch::rope_attention_fwd`` and ``fastpatch::rope_attention_bwd`` wrap the launchers of
:mod:`fastpatch.launchers.rope_attention` as opaque custom ops with fake (meta) implementations,
so ``torch.compile`` traces them without graph breaks; the backward is registered with
``register_autograd``. :func:`rope_attention_triton` is what the public
:func:`fastpatch.rope_attention` calls once inputs are validated.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..launchers.rope_attention import rope_attention_backward, rope_attention_forward
from .direct_launch import launch_directly

__all__ = ["rope_attention_triton"]


@torch.library.custom_op("fastpatch::rope_attention_fwd", mutates_args=())
def rope_attention_fwd(q: Tensor, k: Tensor, v: Tensor, q_pos: Optional[Tensor], k_pos: Optional[Tensor],
                       rope_base: Optional[float], rope_f0: float, scale: float,
                       k_rotation: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """(out (B, Nq, H, Dh) contiguous, lse (B, H, Nq) fp32) for q (B, H, Nq, Dh), k/v (B, H, Nk, Dh)."""
    return rope_attention_forward(q, k, v, q_pos, k_pos, rope_base, rope_f0, scale, k_rotation)


@rope_attention_fwd.register_fake
def _rope_attention_fwd_fake(q, k, v, q_pos, k_pos, rope_base, rope_f0, scale, k_rotation=None):
    batch, heads, seq_q, head_dim = q.shape
    out = q.new_empty((batch, seq_q, heads, head_dim))
    lse = q.new_empty((batch, heads, seq_q), dtype=torch.float32)
    return out, lse


def _token_major_strides(shape) -> Tuple[int, int, int, int]:
    """Strides of a (B, H, N, Dh) view of contiguous (B, N, H, Dh) memory (the gradients' layout)."""
    _, heads, seq_len, head_dim = shape
    return (seq_len * heads * head_dim, head_dim, heads * head_dim, 1)


@torch.library.custom_op("fastpatch::rope_attention_bwd", mutates_args=())
def rope_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       q_pos: Optional[Tensor], k_pos: Optional[Tensor], rope_base: Optional[float], rope_f0: float,
                       scale: float, k_rotation: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) wrt the unrotated q, k, v; shapes of q, k, v, token-major (B, N, H, Dh) memory."""
    return rope_attention_backward(grad_out, q, k, v, out, lse, q_pos, k_pos, rope_base, rope_f0, scale,
                                   k_rotation)


@rope_attention_bwd.register_fake
def _rope_attention_bwd_fake(grad_out, q, k, v, out, lse, q_pos, k_pos, rope_base, rope_f0, scale,
                             k_rotation=None):
    return tuple(x.new_empty_strided(x.shape, _token_major_strides(x.shape)) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, q_pos, k_pos, rope_base, rope_f0, scale, k_rotation = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos)
    ctx.rope_args = (rope_base, rope_f0, scale, k_rotation)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, q_pos, k_pos = ctx.saved_tensors
    grad_q, grad_k, grad_v = rope_attention_bwd(grad_out, q, k, v, out, lse, q_pos, k_pos, *ctx.rope_args)
    return grad_q, grad_k, grad_v, None, None, None, None, None, None


rope_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def rope_attention_triton(q: Tensor, k: Tensor, v: Tensor, q_pos: Optional[Tensor], k_pos: Optional[Tensor],
                          rope_base: Optional[float], rope_f0: float, scale: float, *,
                          k_rotation: Optional[str] = None) -> Tensor:
    """softmax(scale * RoPE(q) RoPE(k)^T) v with the RoPE2D inside the Triton kernels; differentiable in q, k, v.

    Args:
        q: (B, H, Nq, Dh); k, v: (B, H, Nk, Dh); one dtype (fp16/bf16/fp32), any strides, Dh in {32, 64, 128}.
        q_pos: (B, Nq, 2), k_pos: (B, Nk, 2) int64 (y, x) positions (k_pos = q_pos for self-attention);
            unused (may be None) when ``rope_base`` is None.
        rope_base: RoPE2D frequency base (100.0 for DUSt3R), None for no rotation.
        rope_f0: frequency scale F0 (1.0 for DUSt3R).
        scale: softmax scale (Dh ** -0.5 for DUSt3R).
        k_rotation: "in_loop" (rotate key tiles inside the attention loops) or "pre_rotated" (one
            RoPE pass writes rotated copies first); None: the launch-config table's choice.

    Returns:
        (B, Nq, H, Dh) contiguous, in q's dtype (``.view(B, Nq, H * Dh)`` gives head-major channels).
        The gradients of q, k, v come back in the inputs' dtype, stored token-major (B, N, H, Dh).
    """
    if launch_directly(q, k, v, q_pos, k_pos):  # nothing records this call: skip the custom-op dispatch
        out, _ = rope_attention_forward(q, k, v, q_pos, k_pos, rope_base, rope_f0, scale, k_rotation)
    else:
        out, _ = rope_attention_fwd(q, k, v, q_pos, k_pos, rope_base, rope_f0, scale, k_rotation)
    return out

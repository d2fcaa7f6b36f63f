"""qk-norm + RoPE2D attention on the torch path, in chunks of heads (CPU, and the Triton fallback).

For each group of heads: LayerNorm over ``Dh`` of that group's q and k, the RoPE2D rotation (the
DUSt3R layout of :mod:`fastpatch.ops.rope_torch`: two passes over whole rows with ``[cos | cos]``
and ``[-sin | sin]`` tables), ``scaled_dot_product_attention``, and the result copied into one
``(B, N, H, Dh)`` output. Only one group's normalised/rotated q and k exist at a time, so the peak
memory above the inputs is the output plus a few group-sized temporaries (eager holds normalised
q and k, the RoPE chain's temporaries and the rotated copies of the whole layer at once), and each
group's LayerNorm + RoPE runs on data still in cache before its SDPA.

Gradients come from :class:`_QKNormRopeAttention`: its backward recomputes each group's forward
with autograd (activation checkpointing per group), so nothing but the inputs is saved. Inputs
are assumed validated by :func:`fastpatch.qknorm_rope_attention`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..reference_vggt import rope_inverse_frequencies

__all__ = ["rope_rows", "norm_rope", "qknorm_rope_attention_torch", "heads_per_chunk"]

#: Bytes one group's normalised q (or k) may take.
CHUNK_BYTES = 16 << 20


#: At most this fraction of the heads per group: a group's temporaries stay small next to the output,
#: and a group's q', k', v and scores stay in the caches SDPA reads them from. Measured on the 2-core
#: AVX-512 CPU (2026-12-03, bench/test_bench_vggt.py's sizes, VGGT's 16 heads, 15 interleaved rounds vs
#: eager): groups of 2 heads ran the frame op (8 x 1041 tokens) 1.30x eager and the global op (2082
#: tokens) 1.12x; groups of 4: 1.20x / 1.11x; 7: 1.13x / 1.08x; 1: 1.24x / 0.94x (a 1-head global
#: SDPA call has too few blocks for two threads).
CHUNK_FRACTION = 8


def heads_per_chunk(batch: int, heads: int, tokens: int, head_dim: int, element_size: int) -> int:
    """Heads per group: at most ``ceil(H / CHUNK_FRACTION)``, and so that one group's q' takes at most
    :data:`CHUNK_BYTES` (at least 1 head)."""
    per_head = max(1, batch * tokens * head_dim * element_size)
    return max(1, min(-(-heads // CHUNK_FRACTION), CHUNK_BYTES // per_head))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def rope_rows(positions: torch.Tensor, head_dim: int, rope_base: float, dtype: torch.dtype,
              numerics: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(cos_rows, sin_rows)``, each ``(B, 1, N, Dh)``, for ``positions`` ``(B, N, 2)`` integer ``(y, x)``.

    Row layout ``[Y_a | Y_b | X_a | X_b]`` (Q = Dh/4 lanes each): ``cos_rows = [c_y | c_y | c_x | c_x]``,
    ``sin_rows = [-s_y | s_y | -s_x | s_x]``. Angles are fp32 products ``pos * ω`` (spec §2.3); with
    ``numerics="storage"`` they are rounded to ``dtype`` before cos/sin and the tables are in
    ``dtype``; with ``"float32"`` the tables are in fp32 (fp64 for fp64 tokens).
    """
    inverse = rope_inverse_frequencies(head_dim, rope_base, positions.device)
    angles = positions.float().unsqueeze(-1) * inverse  # (B, N, 2, Q) fp32
    table_dtype = dtype if numerics == "storage" else _compute_dtype(dtype)
    angles = angles.to(table_dtype)
    cos, sin = angles.cos(), angles.sin()
    shape = positions.shape[:2] + (head_dim,)
    cos_rows = torch.stack((cos, cos), dim=-2).reshape(shape).unsqueeze(1)
    sin_rows = torch.stack((sin.neg(), sin), dim=-2).reshape(shape).unsqueeze(1)
    return cos_rows, sin_rows


def norm_rope(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, cos_rows: torch.Tensor,
              sin_rows: torch.Tensor, numerics: str) -> torch.Tensor:
    """``RoPE(LayerNorm(x))`` of ``x`` ``(B, h, N, Dh)`` (any strides) in ``x``'s dtype, differentiable.

    ``"float32"``: LN and rotation in fp32 (fp64 for fp64), rounded to ``x.dtype`` once. ``"storage"``:
    the LN output is rounded to ``x.dtype`` and the rotation runs in it, each product and the sum
    rounded (separate ops, as eager's).
    """
    dtype = x.dtype
    compute = _compute_dtype(dtype)
    head_dim = x.shape[-1]
    y = F.layer_norm(x.to(compute), (head_dim,), weight.to(compute), bias.to(compute), eps)
    if numerics == "storage":
        y = y.to(dtype)
    # Peak: y and its swapped copy (layer_norm's internal contiguous copy of a strided x is gone by now).
    quarter = head_dim // 4
    swapped = y.unflatten(-1, (2, 2, quarter)).flip(-2).flatten(-3)  # [Y_b | Y_a | X_b | X_a]
    cos_rows, sin_rows = cos_rows.to(y.dtype), sin_rows.to(y.dtype)
    if y.dtype == dtype and numerics == "storage" and dtype in (torch.float16, torch.bfloat16):
        return y * cos_rows + swapped * sin_rows  # three roundings, as eager's separate ops
    if torch.is_grad_enabled() and (y.requires_grad or swapped.requires_grad):
        return torch.addcmul(y * cos_rows, swapped, sin_rows).to(dtype)
    return y.mul_(cos_rows).addcmul_(swapped, sin_rows).to(dtype)  # y is layer_norm's fresh output


def _group_forward(q, k, v, weights, eps, cos_rows, sin_rows, scale, numerics, dropout_p=0.0):
    q_weight, q_bias, k_weight, k_bias = weights
    qr = norm_rope(q, q_weight, q_bias, eps, cos_rows, sin_rows, numerics)
    kr = norm_rope(k, k_weight, k_bias, eps, cos_rows, sin_rows, numerics)
    return F.scaled_dot_product_attention(qr, kr, v, dropout_p=dropout_p, scale=scale)


def _groups(heads: int, chunk: int):
    return [(start, min(heads, start + chunk)) for start in range(0, heads, chunk)]


class _QKNormRopeAttention(torch.autograd.Function):
    """Chunked forward; backward recomputes each head group's forward with autograd (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, q_weight, q_bias, k_weight, k_bias, cos_rows, sin_rows, eps, scale, numerics, chunk):
        batch, heads, tokens, head_dim = q.shape
        out = torch.empty((batch, tokens, heads, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)
        weights = (q_weight, q_bias, k_weight, k_bias)
        for start, stop in _groups(heads, chunk):
            part = slice(start, stop)
            out[:, part] = _group_forward(q[:, part], k[:, part], v[:, part], weights, eps, cos_rows, sin_rows,
                                          scale, numerics)
        ctx.save_for_backward(q, k, v, q_weight, q_bias, k_weight, k_bias, cos_rows, sin_rows)
        ctx.args = (eps, scale, numerics, chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, q_weight, q_bias, k_weight, k_bias, cos_rows, sin_rows = ctx.saved_tensors
        eps, scale, numerics, chunk = ctx.args
        batch, heads, tokens, head_dim = q.shape

        def token_major(x):
            return torch.zeros((batch, tokens, heads, head_dim), dtype=x.dtype, device=x.device).transpose(1, 2)

        grad_q, grad_k, grad_v = token_major(q), token_major(k), token_major(v)
        weights = [w.detach().requires_grad_(True) for w in (q_weight, q_bias, k_weight, k_bias)]
        weight_grads = [torch.zeros_like(w) for w in weights]
        for start, stop in _groups(heads, chunk):
            part = slice(start, stop)
            inputs = [x[:, part].detach().requires_grad_(True) for x in (q, k, v)]
            with torch.enable_grad():
                out = _group_forward(*inputs, weights, eps, cos_rows, sin_rows, scale, numerics)
                grads = torch.autograd.grad(out, inputs + weights, grad_out[:, part])
            for target, grad in zip((grad_q, grad_k, grad_v), grads[:3]):
                target[:, part] = grad
            for total, grad in zip(weight_grads, grads[3:]):
                total += grad
        return (grad_q, grad_k, grad_v, *weight_grads, None, None, None, None, None, None)


def qknorm_rope_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                                q_bias: torch.Tensor, k_weight: torch.Tensor, k_bias: torch.Tensor,
                                positions: torch.Tensor, rope_base: float, eps: float, scale: float,
                                numerics: str, dropout_p: float = 0.0,
                                chunk: Optional[int] = None) -> torch.Tensor:
    """``softmax(scale RoPE(LN_q(q)) RoPE(LN_k(k))^T) v`` on the torch path, differentiable.

    Args:
        q, k, v: ``(B, H, N, Dh)``, one dtype, any strides (e.g. views of a ``(B, N, 3, H, Dh)`` qkv).
        q_weight, q_bias, k_weight, k_bias: ``(Dh,)`` LayerNorm affine parameters (any float dtype).
        positions: ``(B or 1, N, 2)`` integer ``(y, x)``.
        rope_base, eps, scale: RoPE base, LayerNorm epsilon, score scale.
        numerics: ``"float32"`` or ``"storage"`` (:mod:`fastpatch.reference_vggt`).
        dropout_p: attention dropout (training only); > 0 runs one unchunked autograd graph.
        chunk: heads per group (default :func:`heads_per_chunk`).

    Returns:
        ``(B, H, N, Dh)`` in ``q``'s dtype: a transposed view of a contiguous ``(B, N, H, Dh)`` buffer.
    """
    batch, heads, tokens, head_dim = q.shape
    cos_rows, sin_rows = rope_rows(positions, head_dim, rope_base, q.dtype, numerics)
    if dropout_p > 0.0:
        out = _group_forward(q, k, v, (q_weight, q_bias, k_weight, k_bias), eps, cos_rows, sin_rows, scale,
                             numerics, dropout_p)
        return out.transpose(1, 2).contiguous().transpose(1, 2)
    if chunk is None:
        chunk = heads_per_chunk(batch, heads, tokens, head_dim, torch.finfo(_compute_dtype(q.dtype)).bits // 8)
    return _QKNormRopeAttention.apply(q, k, v, q_weight, q_bias, k_weight, k_bias, cos_rows, sin_rows, eps,
                                      scale, numerics, chunk)

"""RoPE attention on the torch path: RoPE2D rotation of q and k, then ``scaled_dot_product_attention``.

Used for CPU tensors (and any device without Triton) and as the fallback when attention dropout is
active in training. Inputs are assumed validated by :func:`fastpatch.ops.rope_attention.rope_attention`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .rope_torch import rope_cos_sin, rotate_rope

__all__ = ["rope_attention_torch"]


def rope_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: Optional[torch.Tensor],
                         k_pos: Optional[torch.Tensor], rope_base: Optional[float], rope_f0: float, scale: float,
                         dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(rope(q) rope(k)^T * scale) v, differentiable.

    Args:
        q: ``(B, H, Nq, Dh)``; k, v: ``(B, H, Nk, Dh)``; any strides.
        q_pos, k_pos: ``(B, Nq, 2)`` / ``(B, Nk, 2)`` integer ``(y, x)``; unused when ``rope_base`` is None.
        rope_base, rope_f0: RoPE2D frequency base and ``F0``; ``rope_base=None`` skips the rotation.
        scale: multiplier of the scores.
        dropout_p: attention-probability dropout (training only; the caller decides).

    Returns:
        ``(B, H, Nq, Dh)``. On CPU this is usually a transposed view of a ``(B, Nq, H, Dh)`` buffer,
        so merging heads afterwards is free.
    """
    if rope_base is not None:
        head_dim = q.shape[-1]
        cos_q, sin_q = rope_cos_sin(q_pos, head_dim, rope_base, rope_f0, q.dtype)
        if k_pos is q_pos:
            cos_k, sin_k = cos_q, sin_q
        else:
            cos_k, sin_k = rope_cos_sin(k_pos, head_dim, rope_base, rope_f0, k.dtype)
        q = rotate_rope(q, cos_q, sin_q)
        k = rotate_rope(k, cos_k, sin_k)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)

"""2-D rotary position embedding (RoPE2D) on the torch path: rotation tables and the rotation itself.

Layout (spec section 3): each head's ``Dh`` channels are four consecutive blocks of ``Q = Dh / 4``,
``[Y_a | Y_b | X_a | X_b]``. Channel ``j`` of ``Y_a`` is paired with channel ``j`` of ``Y_b`` and
rotated by ``theta = y * omega_j``; the ``X`` half likewise by ``x * omega_j``, with
``omega_j = F0 * base ** (-j / Q)``::

    a' = a * cos(theta) - b * sin(theta)
    b' = b * cos(theta) + a * sin(theta)

Everything stays on the positions' device: angles are computed from the positions tensor, never
from a host-side maximum, so nothing here synchronises with a GPU.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch

from ..launchers.device import refuse_first_use_in_capture

__all__ = ["rope_frequencies", "rope_cos_sin", "rotate_rope"]


@functools.lru_cache(maxsize=64)
def rope_frequencies(head_dim: int, base: float, f0: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``Q = head_dim // 4`` angular frequencies ``F0 * base ** (-j / Q)``, shape ``(Q,)``, in ``dtype``.

    Computed in float64 then rounded once, and cached per ``(head_dim, base, f0, dtype, device)``;
    the result is read-only by convention (never written in place). It is built outside inference
    mode so a table first made under ``torch.inference_mode()`` still serves later autograd calls.
    """
    refuse_first_use_in_capture(device, "RoPE frequency table")
    quarter = head_dim // 4
    with torch.inference_mode(False):
        exponents = torch.arange(quarter, dtype=torch.float64) / quarter
        return (f0 * base ** (-exponents)).to(device=device, dtype=dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float, f0: float,
                 dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables for integer ``positions`` of shape ``(B, N, 2)`` holding ``(y, x)``.

    Angles, cosines and sines are computed in float32 (float64 for float64 tokens) and rounded
    once to ``dtype``.

    Returns:
        ``(cos, sin)``, each ``(B, 1, N, 2, Q)`` in ``dtype``: axis 3 is ``(y, x)``, axis 4 the
        frequency ``j``; the singleton axis broadcasts over heads.
    """
    angle_dtype = torch.promote_types(dtype, torch.float32)
    # Under torch.compile the table is traced into the graph (constant-folded): no lru_cache lookup.
    frequencies = rope_frequencies.__wrapped__ if torch.compiler.is_compiling() else rope_frequencies
    omega = frequencies(head_dim, float(base), float(f0), angle_dtype, positions.device)
    angles = positions.to(angle_dtype).unsqueeze(-1) * omega  # (B, N, 2, Q)
    return angles.cos().to(dtype).unsqueeze(1), angles.sin().to(dtype).unsqueeze(1)


def _rotate_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Out-of-place rotation of ``x`` (B, H, N, Dh) into a fresh ``(B, N, H, Dh)`` buffer, returned as
    its ``(B, H, N, Dh)`` transposed view (the layout a qkv projection produces)."""
    batch, heads, tokens, head_dim = x.shape
    out = torch.empty((batch, tokens, heads, head_dim), dtype=x.dtype, device=x.device).transpose(1, 2)
    quarter = head_dim // 4
    x_pairs = x.unflatten(-1, (2, 2, quarter))  # (B, H, N, y/x, a/b, Q)
    out_pairs = out.unflatten(-1, (2, 2, quarter))
    x_a, x_b = x_pairs[..., 0, :], x_pairs[..., 1, :]
    out_a, out_b = out_pairs[..., 0, :], out_pairs[..., 1, :]
    torch.mul(x_a, cos, out=out_a)
    out_a.addcmul_(x_b, sin, value=-1.0)
    torch.mul(x_b, cos, out=out_b)
    out_b.addcmul_(x_a, sin)
    return out


def _rotate_traced(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`_rotate_into` without ``out=`` writes into strided views, which ``torch.compile``
    cannot trace (a graph break); same values and the same token-major ``(B, N, H, Dh)`` memory."""
    quarter = x.shape[-1] // 4
    x_a, x_b = x.transpose(1, 2).unflatten(-1, (2, 2, quarter)).unbind(-2)  # (B, N, H, y/x, Q) each
    cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, N, 1, y/x, Q)
    out = torch.stack((x_a * cos - x_b * sin, x_b * cos + x_a * sin), dim=-2)  # (B, N, H, y/x, a/b, Q)
    return out.flatten(-3).transpose(1, 2)


class _RopeRotation(torch.autograd.Function):
    """Rotation as an autograd op: the backward is the inverse rotation (``sin -> -sin``), itself
    expressed through this Function so double backward works."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        if torch.compiler.is_compiling():
            return _rotate_traced(x, cos, sin)
        return _rotate_into(x, cos, sin)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _RopeRotation.apply(grad_out, cos, sin.neg()), None, None


def rotate_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE2D to ``x`` of shape ``(B, H, N, Dh)`` (any strides), out of place.

    Args:
        x: tokens, ``Dh`` divisible by 4.
        cos, sin: tables from :func:`rope_cos_sin` for the same ``N`` and ``Dh``, in ``x.dtype``.

    Returns:
        ``(B, H, N, Dh)``: a transposed view of a contiguous ``(B, N, H, Dh)`` buffer. Differentiable
        with respect to ``x``.
    """
    return _RopeRotation.apply(x, cos, sin)

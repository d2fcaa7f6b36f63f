"""Public RoPE attention: ``softmax(rope(q) rope(k)^T * scale) v`` with 2-D rotary positions.

This file validates the inputs (shapes, dtypes, devices; no host synchronisation) and picks the
implementation with :func:`fastpatch.backend.decide`:

* ``"triton"``: the flash-attention kernels of :mod:`fastpatch.ops.rope_attention_triton`
  (CUDA, or CPU under the Triton interpreter);
* ``"torch"``: :mod:`fastpatch.ops.rope_attention_torch` (RoPE tables + ``scaled_dot_product_attention``).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..backend import decide
from ..kernels.rope_attention_configs import DTYPES as TRITON_DTYPES  # a plain table: no triton import
from ..triton_available import imported_once
from .rope_attention_torch import rope_attention_torch

__all__ = ["rope_attention"]

@imported_once
def _triton_op():
    """The Triton custom op (:func:`fastpatch.ops.rope_attention_triton.rope_attention_triton`), imported
    on the first Triton call (``import fastpatch`` never imports triton), then held: no import per call."""
    from .rope_attention_triton import rope_attention_triton

    return rope_attention_triton


def _check_tokens(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, H, N, Dh), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    return t


_COMMON_POSITION_DTYPES = frozenset((torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))


def _check_positions(name: str, pos: object, batch: int, tokens: int) -> torch.Tensor:
    if isinstance(pos, torch.Tensor) and pos.dtype in _COMMON_POSITION_DTYPES and pos.shape == (batch, tokens, 2):
        return pos  # the usual case, in one test; anything else gets the detailed checks below
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer (y, x) positions, got {type(pos).__name__}")
    if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype (int64 preferred), got {pos.dtype}")
    if pos.dim() != 3 or pos.shape[2] != 2:
        raise ValueError(f"{name} must have shape (B, N, 2) holding (y, x), got {tuple(pos.shape)}")
    if pos.shape[0] != batch or pos.shape[1] != tokens:
        raise ValueError(f"{name} has shape {tuple(pos.shape)} but the tokens need ({batch}, {tokens}, 2): "
                         "one (y, x) pair per token")
    return pos


def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: Optional[torch.Tensor],
                   k_pos: Optional[torch.Tensor] = None, *, rope_base: Optional[float] = 100.0,
                   rope_f0: float = 1.0, scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention with RoPE2D applied to ``q`` and ``k`` (not ``v``).

    Args:
        q: queries ``(B, H, Nq, Dh)``, any strides (e.g. a view of a ``(B, N, 3, H, Dh)`` qkv buffer).
        k, v: keys and values ``(B, H, Nk, Dh)``, any strides; same dtype and device as ``q``.
        q_pos: ``(B, Nq, 2)`` integer ``(y, x)`` grid positions of the queries. May be None only
            when ``rope_base`` is None.
        k_pos: ``(B, Nk, 2)`` positions of the keys; None means ``q_pos`` (then ``Nk`` must equal ``Nq``).
        rope_base: RoPE2D frequency base (100 for DUSt3R, the ``RoPE100`` config); None: no rotation,
            plain attention.
        rope_f0: RoPE2D ``F0`` (frequency multiplier).
        scale: score multiplier; None means ``Dh ** -0.5``.
        dropout_p: dropout on the attention probabilities; pass it only in training.

    Where the Triton backend is selected but cannot run the call (``dropout_p > 0``, a head dim
    other than 32/64/128, float64), the torch path runs instead and a ``RuntimeWarning`` says why.

    Returns:
        ``(B, H, Nq, Dh)`` in ``q``'s dtype. Usually a transposed view of a contiguous
        ``(B, Nq, H, Dh)`` buffer, so ``out.transpose(1, 2).reshape(B, Nq, H * Dh)`` merges heads
        without a copy.

    Raises:
        TypeError: non-tensor inputs, non-floating tokens, mismatched token dtypes, non-integer positions.
        ValueError: wrong ranks or shapes, ``Dh`` not divisible by 4 when rotating, position counts
            that differ from the sequence lengths, tensors on different devices, bad ``dropout_p``.
    """
    _check_tokens("q", q)
    _check_tokens("k", k)
    _check_tokens("v", v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads, n_q, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on batch, heads and head dim")
    n_k = k.shape[2]
    if k_pos is None and q_pos is not None:
        if n_k != n_q:
            raise ValueError(f"k_pos is required when Nk ({n_k}) differs from Nq ({n_q})")
        k_pos = q_pos
    if rope_base is not None:
        if head_dim % 4 != 0:
            raise ValueError(f"RoPE2D needs a head dim divisible by 4, got {head_dim}")
        if q_pos is None:
            raise ValueError("q_pos is required when rope_base is set (pass rope_base=None for plain attention)")
    if q_pos is not None:
        _check_positions("q_pos", q_pos, batch, n_q)
        if k_pos is not q_pos:
            _check_positions("k_pos", k_pos, batch, n_k)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is None:
        scale = head_dim ** -0.5

    decision = decide("rope_attention", q, k, v, q_pos, k_pos, dtype=q.dtype, head_dim=head_dim, dropout_p=dropout_p)
    if decision.fallback:
        warnings.warn(f"fastpatch: {decision.reason}; this attention runs on the torch path", RuntimeWarning,
                      stacklevel=2)
    if decision.backend == "torch":
        return rope_attention_torch(q, k, v, q_pos, k_pos, rope_base, rope_f0, scale, dropout_p)

    if q_pos is not None and not q_pos.dtype == k_pos.dtype == torch.int64:
        q_pos, k_pos = q_pos.long(), k_pos.long()  # the kernels read int64
    out = _triton_op()(q, k, v, q_pos, k_pos, rope_base, rope_f0, scale)
    return out.transpose(1, 2)

"""Public qk-norm + RoPE2D attention (VGGT, π3): ``softmax(scale q' k'^T) v`` with
``q' = RoPE2D(LayerNorm_q(q))`` and ``k' = RoPE2D(LayerNorm_k(k))`` (per-head LayerNorm over ``Dh``).

This file validates the inputs (no host synchronisation), derives the positions and picks the
implementation with :func:`fastpatch.backend.decide`:

* ``"triton"``: :mod:`fastpatch.ops.qknorm_rope_attention_triton` (CUDA, or CPU under the interpreter);
* ``"torch"``: :mod:`fastpatch.ops.qknorm_rope_attention_torch` (head groups, SDPA).

Positions are either a tensor, or a *grid description* ``(height, width, special)`` of the
aggregators' token layout (spec §1.3): each frame is ``special`` tokens at ``(0, 0)`` followed by
the ``height x width`` patch grid row-major, patch ``(r, c)`` at ``(r + 1, c + 1)``; a sequence of
several frames (global attention) repeats it, token ``t`` at the position of ``t mod n``. The
Triton kernels derive positions from the token index then (no position tensor is read).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Tuple, Union

import torch

from ..backend import decide
from ..reference_vggt import NUMERICS, grid_positions
from ..triton_available import imported_once
from .qknorm_rope_attention_torch import qknorm_rope_attention_torch

__all__ = ["TokenGrid", "qknorm_rope_attention"]


class TokenGrid(NamedTuple):
    """The aggregators' per-frame token layout: ``special`` tokens at (0, 0), then a ``height x width``
    patch grid at ``(r + 1, c + 1)``; ``n = special + height * width`` tokens per frame."""

    height: int
    width: int
    special: int = 5

    @property
    def tokens_per_frame(self) -> int:
        return self.special + self.height * self.width


@imported_once
def _triton_op():
    """The Triton entry point, imported on the first Triton call (``import fastpatch`` never imports triton)."""
    from .qknorm_rope_attention_triton import qknorm_rope_attention_triton

    return qknorm_rope_attention_triton


def _check_tokens(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, H, N, Dh), got shape {tuple(t.shape)}")
    return t


def _norm_parameter(name: str, value: Optional[torch.Tensor], head_dim: int, like: torch.Tensor,
                    fill: float) -> torch.Tensor:
    if value is None:
        return torch.full((head_dim,), fill, dtype=torch.float32, device=like.device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if value.shape != (head_dim,):
        raise ValueError(f"{name} must have shape ({head_dim},) (one value per head channel), got {tuple(value.shape)}")
    return value


def _check_grid(grid: object, tokens: int) -> TokenGrid:
    if not isinstance(grid, tuple) or len(grid) not in (2, 3):
        raise TypeError(f"grid must be a (height, width, special) tuple or a TokenGrid, got {grid!r}")
    if not all(isinstance(g, int) and not isinstance(g, bool) for g in grid):
        raise TypeError(f"grid entries must be ints, got {grid!r}")
    grid = TokenGrid(*grid)
    if grid.height <= 0 or grid.width <= 0 or grid.special < 0:
        raise ValueError(f"grid needs height > 0, width > 0, special >= 0, got {tuple(grid)}")
    if tokens % grid.tokens_per_frame != 0:
        raise ValueError(f"the sequence has {tokens} tokens, not whole frames of {grid.special} + {grid.height}x"
                         f"{grid.width} = {grid.tokens_per_frame} tokens")
    return grid


def _check_positions(pos: object, batch: int, tokens: int) -> torch.Tensor:
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor of integer (y, x), got {type(pos).__name__}")
    if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
        raise TypeError(f"positions must have an integer dtype, got {pos.dtype}")
    if pos.dim() != 3 or pos.shape[2] != 2 or pos.shape[1] != tokens or pos.shape[0] not in (1, batch):
        raise ValueError(f"positions must have shape ({batch} or 1, {tokens}, 2) holding (y, x), "
                         f"got {tuple(pos.shape)}")
    return pos


def _split_qkv(qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"a single tensor must be the qkv projection (B, N, 3, H, Dh), got {tuple(qkv.shape)}")
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return q, k, v


def qknorm_rope_attention(q: torch.Tensor, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None, *,
                          q_norm_weight: Optional[torch.Tensor], q_norm_bias: Optional[torch.Tensor],
                          k_norm_weight: Optional[torch.Tensor], k_norm_bias: Optional[torch.Tensor],
                          positions: Optional[torch.Tensor] = None,
                          grid: Union[TokenGrid, Tuple[int, int, int], None] = None,
                          rope_base: float = 100.0, eps: float = 1e-5, scale: Optional[float] = None,
                          numerics: str = "float32", dropout_p: float = 0.0) -> torch.Tensor:
    """Attention with per-head LayerNorm then RoPE2D on q and k (VGGT / π3 aggregator attention).

    Args:
        q: queries ``(B, H, N, Dh)``, any strides; or, with ``k`` and ``v`` None, the qkv projection
            ``(B, N, 3, H, Dh)`` (qkv channel ``s*C + h*Dh + j``, unflattened).
        k, v: ``(B, H, N, Dh)``, same shape, dtype and device as ``q`` (self-attention).
        q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias: ``(Dh,)`` LayerNorm affine parameters
            of ``q_norm`` / ``k_norm`` (any float dtype, usually fp32); None means 1 (weight) / 0 (bias).
        positions: ``(B or 1, N, 2)`` integer ``(y, x)``; or None with ``grid``.
        grid: ``(height, width, special)`` (a :class:`TokenGrid`): positions from the token index (module
            docstring); ``N`` must be a whole number of frames. Exactly one of ``positions`` / ``grid``.
        rope_base: RoPE2D frequency base (100 for VGGT and π3).
        eps: the LayerNorms' epsilon (1e-5 for both models).
        scale: score multiplier; None means ``Dh ** -0.5``.
        numerics: ``"float32"`` (VGGT under autocast, and fp32: LN and RoPE in fp32, one rounding to the
            storage dtype) or ``"storage"`` (π3, or a model run natively in bf16/fp16: LN output, angles,
            tables and each RoPE op rounded to the storage dtype). Identical for fp32 inputs.
        dropout_p: attention dropout; pass it only in training (torch path).

    Where the Triton backend is selected but cannot run the call (dropout, forward-mode AD, a head dim
    other than 32/64/128, float64) the torch path runs instead with a ``RuntimeWarning``.

    Returns:
        ``(B, H, N, Dh)`` in the tokens' dtype: a transposed view of a contiguous ``(B, N, H, Dh)``
        buffer, so ``out.transpose(1, 2).reshape(B, N, H * Dh)`` merges heads without a copy.
        Differentiable wrt q, k, v (or qkv) and the four norm parameters.

    Raises:
        TypeError: non-tensor or non-floating tokens/parameters, mismatched dtypes, integer-free positions,
            a malformed grid.
        ValueError: wrong shapes, both or neither of ``positions`` / ``grid``, a sequence that is not whole
            frames of the grid, ``Dh`` not divisible by 4, devices that differ, bad numerics/eps/dropout.
    """
    if k is None and v is None:
        q, k, v = _split_qkv(q)
    elif k is None or v is None:
        raise ValueError("pass q, k and v, or the qkv projection alone")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tokens(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have one shape (self-attention), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    batch, heads, tokens, head_dim = q.shape
    if head_dim % 4 != 0:
        raise ValueError(f"RoPE2D needs a head dim divisible by 4, got {head_dim}")
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if (positions is None) == (grid is None):
        raise ValueError("pass exactly one of positions (a (B, N, 2) tensor) and grid ((height, width, special))")
    weights = [_norm_parameter(name, value, head_dim, q, fill) for name, value, fill in (
        ("q_norm_weight", q_norm_weight, 1.0), ("q_norm_bias", q_norm_bias, 0.0),
        ("k_norm_weight", k_norm_weight, 1.0), ("k_norm_bias", k_norm_bias, 0.0))]
    if grid is not None:
        grid = _check_grid(grid, tokens)
    else:
        _check_positions(positions, batch, tokens)
    scale = head_dim ** -0.5 if scale is None else float(scale)

    decision = decide("qknorm_rope_attention", q, k, v, *weights, positions, dtype=q.dtype, head_dim=head_dim,
                      dropout_p=dropout_p)
    if decision.fallback:
        warnings.warn(f"fastpatch: {decision.reason}; this attention runs on the torch path", RuntimeWarning,
                      stacklevel=2)
    if decision.backend == "torch":
        if positions is None:
            positions = grid_positions(tokens, grid.height, grid.width, grid.special, q.device).unsqueeze(0)
        return qknorm_rope_attention_torch(q, k, v, *weights, positions, float(rope_base), float(eps), scale,
                                           numerics, dropout_p)
    if positions is not None and positions.dtype != torch.int64:
        positions = positions.long()  # the kernels read int64
    out = _triton_op()(q, k, v, *weights, positions, None if grid is None else tuple(grid), float(rope_base),
                       float(eps), scale, numerics)
    return out.transpose(1, 2)

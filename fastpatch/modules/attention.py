"""Drop-in RoPE2D, Attention and CrossAttention (spec sections 3 to 5) running :func:`rope_attention`.

Each class subclasses its eager twin in :mod:`fastpatch.reference`, so constructor arguments,
attributes, parameters and ``state_dict`` keys are upstream's; only ``forward`` differs. Heads stay
strided views of the projection output (no permute copies), RoPE and attention run in one call
(fused into the flash kernel on the Triton path), and heads are merged with a free reshape.
Projections that are plain ``nn.Linear`` layers run :func:`fastpatch.ops.linear_onednn.linear`
(oneDNN on CPU float32 inference, ``F.linear`` otherwise); others are called as modules.
"""
from __future__ import annotations

from typing import FrozenSet, Optional

import torch

from .. import reference
from ..ops.linear_onednn import linear
from ..ops.rope_attention import rope_attention
from ..ops.rope_torch import rope_cos_sin, rotate_rope
from .plain_children import plain_linear

__all__ = ["RoPE2D", "Attention", "CrossAttention"]


class RoPE2D(reference.RoPE2D):
    """2-D rotary embedding: ``forward(tokens (B, H, N, Dh), positions (B, N, 2) int) -> (B, H, N, Dh)``.

    Same constructor (``freq``, ``F0``) and attributes (``base``, ``F0``) as upstream. The rotation
    runs out of place from cos/sin tables built on the positions' device (no host sync); the
    result is a transposed view of a contiguous ``(B, N, H, Dh)`` buffer. Attention modules do
    not call it: they pass ``base``/:func:`effective_f0` to :func:`rope_attention`, which rotates
    inside the kernel.

    ``ignored_attributes`` (class default empty) holds ``"F0"`` when :func:`fastpatch.patch_model`
    replaced a RoPE2D whose code ignores ``F0`` (croco's torch RoPE2D before 2f3d5d5): the
    frequencies are then ``base ** (-j / Q)`` whatever ``F0`` says, as there.
    """

    ignored_attributes: FrozenSet[str] = frozenset()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        head_dim = tokens.shape[-1]
        if head_dim % 4 != 0:
            raise ValueError(f"RoPE2D needs a head dim divisible by 4, got {head_dim}")
        cos, sin = rope_cos_sin(positions, head_dim, self.base, effective_f0(self), tokens.dtype)
        return rotate_rope(tokens, cos, sin)


def effective_f0(rope: torch.nn.Module) -> float:
    """The ``F0`` a RoPE module applies: its ``F0``, or 1 when its ``ignored_attributes`` hold ``"F0"``."""
    return 1.0 if "F0" in getattr(rope, "ignored_attributes", ()) else float(rope.F0)


class _AttentionSemantics:
    """What a fastpatch attention module reads, as :func:`fastpatch.patch_model` sets it per instance to
    compute exactly what the module it replaced computed (class defaults: upstream croco's behaviour).

    Attributes:
        ignored_attributes: of ``{"scale", "attn_drop"}``, those the replaced module's forward never
            used: ``scale`` ignored means ``Dh ** -0.5`` (SDPA's default), ``attn_drop`` ignored means
            no attention dropout in training.
        optional_positions: how the replaced module's forward took ``None`` position arguments
            (upstream's cannot: with a rope and no positions fastpatch raises): ``"each"`` rotates
            q and k each only when its own positions are given, ``"both"`` rotates only when both
            are given; ``""``: upstream's behaviour.
    """

    ignored_attributes: FrozenSet[str] = frozenset()
    optional_positions: str = ""


def project(layer: torch.nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``layer(x)`` (+ ``residual``): :func:`linear` on its parameters when ``layer`` is a plain
    ``nn.Linear`` (the residual add fused on oneDNN), else a module call."""
    if plain_linear(layer):
        return linear(x, layer.weight, layer.bias, residual=residual)
    out = layer(x)
    return out if residual is None else residual + out


def _rotate_if_placed(rope: torch.nn.Module, x: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """``x`` (B, H, N, Dh) rotated by ``rope``'s RoPE2D at ``positions`` (torch ops), or ``x`` if they are None."""
    if positions is None:
        return x
    cos, sin = rope_cos_sin(positions, x.shape[-1], float(rope.base), effective_f0(rope), x.dtype)
    return rotate_rope(x, cos, sin)


def _attend(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            q_pos: Optional[torch.Tensor], k_pos: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention of ``module`` (its ``rope``, ``scale`` and ``attn_drop``, as its
    :class:`_AttentionSemantics` say) on (B, H, N, Dh) heads.

    Returns ``(B, Nq, H * Dh)``, heads merged in head-major channel order.
    """
    rope = module.rope
    if rope is not None and module.optional_positions and (q_pos is None or k_pos is None):
        # The replaced module skipped RoPE for a None position argument ("each": only on that side).
        if module.optional_positions == "each":
            q, k = _rotate_if_placed(rope, q, q_pos), _rotate_if_placed(rope, k, k_pos)
        rope = q_pos = k_pos = None
    if rope is None:
        rope_base, rope_f0, q_pos, k_pos = None, 1.0, None, None
    elif hasattr(rope, "base") and hasattr(rope, "F0"):
        rope_base, rope_f0 = float(rope.base), effective_f0(rope)
    else:
        raise TypeError(f"rope must be a RoPE2D (with .base and .F0 attributes) or None, got {type(rope).__name__}")
    ignored = module.ignored_attributes
    dropout_p = module.attn_drop.p if module.training and "attn_drop" not in ignored else 0.0
    scale = None if "scale" in ignored else module.scale
    out = rope_attention(q, k, v, q_pos, k_pos, rope_base=rope_base, rope_f0=rope_f0, scale=scale,
                         dropout_p=dropout_p)
    batch, heads, tokens, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


class Attention(_AttentionSemantics, reference.Attention):
    """Multi-head self-attention with optional RoPE2D: ``forward(x (B, N, C), xpos (B, N, 2)) -> (B, N, C)``.

    Keys ``qkv.weight`` (3C, C), ``qkv.bias`` (if ``qkv_bias``), ``proj.weight``, ``proj.bias``. q, k and
    v are (B, H, N, Dh) strided views of the (B, N, 3, H, Dh) projection.
    """

    def forward(self, x: torch.Tensor, xpos: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.proj_drop(project(self.proj, self.attend(x, xpos)))

    def attend(self, x: torch.Tensor, xpos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Everything before ``proj``: qkv projection, RoPE, attention; ``(B, N, C)``, heads merged."""
        batch, tokens, channels = x.shape
        qkv = project(self.qkv, x).unflatten(-1, (3, self.num_heads, channels // self.num_heads))
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return _attend(self, q, k, v, xpos, xpos)


class CrossAttention(_AttentionSemantics, reference.CrossAttention):
    """Multi-head cross-attention with optional RoPE2D.

    ``forward(query (B, Nq, C), key (B, Nk, C), value (B, Nk, C), qpos (B, Nq, 2), kpos (B, Nk, 2))``
    -> (B, Nq, C). Keys ``projq``, ``projk``, ``projv``, ``proj``. Nq may differ from Nk.
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                qpos: Optional[torch.Tensor] = None, kpos: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.proj_drop(project(self.proj, self.attend(query, key, value, qpos, kpos)))

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               qpos: Optional[torch.Tensor] = None, kpos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Everything before ``proj``: q/k/v projections, RoPE, attention; ``(B, Nq, C)``, heads merged."""
        heads = self.num_heads
        q = project(self.projq, query).unflatten(-1, (heads, -1)).transpose(1, 2)
        k = project(self.projk, key).unflatten(-1, (heads, -1)).transpose(1, 2)
        v = project(self.projv, value).unflatten(-1, (heads, -1)).transpose(1, 2)
        return _attend(self, q, k, v, qpos, kpos)

"""Spec-written variants of the DUSt3R/CroCo classes, for the behavioural-verification tests of ``patch_model``.

Every class here is written from ``shared/spec/dust3r-vit.md`` (never from upstream's code) and is
*named* like the upstream class it stands in for (its role: ``Attention``, ``RoPE2D``...) through
:func:`upstream_name`, the way tools built on dust3r name their forks; its ``__qualname__`` keeps the
descriptive name used here. None of them is a known upstream version, so ``patch_model`` can only
accept one by running it against fastpatch's replacement (the probe).

Two families (see tests/patching/test_patching_variants.py):

* **harmless** variants compute the spec's function in another form (SDPA instead of an explicit
  softmax, an offset cos/sin table, a different ``_init_weights``, an extra ``.contiguous()``,
  optional positions, a reordered block forward, an unused helper): they must be accepted;
* **real changes** compute something else, at least under some input, setting or attribute value
  (attention over the heads axis, no portrait handling, attention maps returned, a mask, a 3-D RoPE
  switch, qk-norm, LayerScale, a temperature, RoPE in half precision; and changes only some inputs
  show: swapped RoPE axes, a clamped RoPE table, the first sample's positions for all, squares taken
  for portraits, a training-only change): they must be left alone.

``DerivedSdpaAttention`` / ``DerivedTemperatureAttention`` keep their own names and derive from
fastpatch's eager ``Attention`` instead (a class deriving from a replaced one).

Child modules the variants hold (attention inside blocks, ``Mlp``, the position getter, the RoPE of
an attention variant) come from :mod:`fastpatch.reference`, fastpatch's own spec-written eager
classes, unless a test passes another one.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastpatch import reference

__all__ = [
    "upstream_name", "spec_layer_norm",
    # RoPE2D
    "OffsetTableRoPE2D", "CachingOffsetTableRoPE2D", "Switchable3dRoPE2D", "SwappedAxesRoPE2D",
    "ClampedTableRoPE2D", "FirstSamplePositionsRoPE2D",
    # Attention
    "SdpaAttention", "SdpaScaledAttention", "ContiguousAttention", "OptionalPositionsAttention",
    "AttentionMapsAttention", "MaskedAttention", "QkNormAttention", "TemperatureAttention",
    "HalfRopeInFp32Attention", "HalfRopeAttention", "HelperTemperatureAttention", "TrainingScaledAttention",
    "DerivedSdpaAttention", "DerivedTemperatureAttention",
    # CrossAttention
    "SdpaCrossAttention", "OptionalPositionsCrossAttention", "HeadsAxisSdpaCrossAttention",
    # Blocks
    "PreNormBlock", "NoDropPathBlock", "MemoryFirstDecoderBlock", "LayerScaleBlock", "GammaBlock",
    # Patch embeddings
    "GridPositionGetter", "TruncNormalInitPatchEmbed", "KaimingInitManyARPatchEmbed", "LandscapeOnlyManyARPatchEmbed",
    "SquareAsPortraitManyARPatchEmbed",
]


def upstream_name(role: str):
    """Class decorator: give a variant the upstream class name it stands in for (``__name__``), keeping
    its descriptive ``__qualname__`` for messages."""

    def rename(cls: type) -> type:
        cls.__name__ = role
        return cls

    return rename


#: Spec: every LayerNorm uses eps = 1e-6 with affine weight and bias.
spec_layer_norm = functools.partial(nn.LayerNorm, eps=1e-6)


# ----------------------------------------------------------------------------------------------
# Tensor helpers (spec sections 3 and 4): plain functions, so the variants' forwards only touch
# ``self`` through attributes.
# ----------------------------------------------------------------------------------------------
def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, H, N, Dh): head h holds channels h*Dh .. (h+1)*Dh - 1."""
    batch, tokens, channels = x.shape
    return x.view(batch, tokens, num_heads, channels // num_heads).transpose(1, 2)


def qkv_heads(qkv: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused (B, N, 3C) projection -> q, k, v (B, H, N, Dh): rows [0, C) give q, [C, 2C) k, [2C, 3C) v."""
    q, k, v = qkv.chunk(3, dim=-1)
    return split_heads(q, num_heads), split_heads(k, num_heads), split_heads(v, num_heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, Dh) -> (B, N, H*Dh), head-major channel order."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention logits q·kᵀ·scale, (B, H, Nq, Nk)."""
    return (q @ k.transpose(-2, -1)) * scale


def rope_frequencies_fp32(quarter: int, base: float, f0: float, device) -> torch.Tensor:
    """ω_j = F0·base^(−j/Q), j = 0..Q−1, computed in float32 like the spec's eager path."""
    exponents = torch.arange(quarter, dtype=torch.float32, device=device) / quarter
    return f0 * torch.pow(torch.tensor(float(base), dtype=torch.float32, device=device), -exponents)


def rope_offset_tables(quarter: int, lowest: int, highest: int, base: float, f0: float, device,
                       dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of p·ω_j for every integer p in [lowest, highest]: tables (highest - lowest + 1, Q).

    Row ``p + offset`` with ``offset = -lowest`` serves position p, negative positions included. Angles are
    float32 products rounded to the token dtype before cos/sin (the spec's eager path).
    """
    omega = rope_frequencies_fp32(quarter, base, f0, device)
    coordinates = torch.arange(lowest, highest + 1, dtype=torch.float32, device=device)
    angles = (coordinates[:, None] * omega[None, :]).to(dtype)
    return angles.cos(), angles.sin()


def rotate_pairs(half: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel j with channel j + Q of ``half`` (..., 2Q) by the angles whose cos/sin are given (..., Q)."""
    a, b = half.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def rotate_by_table(tokens: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    offset: int) -> torch.Tensor:
    """RoPE2D of tokens (B, H, N, Dh) at positions (B, N, 2) (y, x) from offset tables (see :func:`rope_offset_tables`)."""
    rows = positions + offset  # table rows, (B, N, 2)
    y_half, x_half = tokens.chunk(2, dim=-1)
    cos_y, sin_y = cos[rows[..., 0]][:, None], sin[rows[..., 0]][:, None]  # (B, 1, N, Q): broadcast over heads
    cos_x, sin_x = cos[rows[..., 1]][:, None], sin[rows[..., 1]][:, None]
    return torch.cat((rotate_pairs(y_half, cos_y, sin_y), rotate_pairs(x_half, cos_x, sin_x)), dim=-1)


def as_pair(value) -> Tuple[int, int]:
    """Scalars are duplicated; pairs are returned as tuples."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


# ----------------------------------------------------------------------------------------------
# RoPE2D (spec section 3)
# ----------------------------------------------------------------------------------------------
@upstream_name("RoPE2D")
class OffsetTableRoPE2D(nn.Module):
    """Harmless: builds one cos/sin table over [min position, max position] and indexes it with
    ``position + offset``, so negative positions work too. ω in float32 like the spec's eager path."""

    def __init__(self, freq: float = 100.0, F0: float = 1.0):
        super().__init__()
        self.base = float(freq)
        self.F0 = float(F0)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        lowest, highest = int(positions.min()), int(positions.max())
        cos, sin = rope_offset_tables(tokens.shape[-1] // 4, lowest, highest, self.base, self.F0, tokens.device,
                                      tokens.dtype)
        return rotate_by_table(tokens, positions, cos, sin, -lowest)


@upstream_name("RoPE2D")
class CachingOffsetTableRoPE2D(OffsetTableRoPE2D):
    """Harmless: :class:`OffsetTableRoPE2D` that memoises its tables in a ``cache`` dict, keyed by
    (Q, lowest, highest, device, dtype). Probing must never add entries to the original's cache."""

    def __init__(self, freq: float = 100.0, F0: float = 1.0):
        super().__init__(freq, F0)
        self.cache = {}

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        lowest, highest = int(positions.min()), int(positions.max())
        key = (tokens.shape[-1] // 4, lowest, highest, tokens.device, tokens.dtype)
        if key not in self.cache:
            self.cache[key] = rope_offset_tables(key[0], lowest, highest, self.base, self.F0, tokens.device,
                                                 tokens.dtype)
        cos, sin = self.cache[key]
        return rotate_by_table(tokens, positions, cos, sin, -lowest)


@upstream_name("RoPE2D")
class Switchable3dRoPE2D(nn.Module):
    """Real change: a ``use_3d`` switch (False by default) turns on a 3-D branch for video tokens, positions
    (B, N, 3) holding (t, y, x): frames are stacked vertically (row y + t·frame_rows) before the 2-D rotation.
    With the switch off it is the spec's RoPE2D; flipping it after patching must still take effect."""

    def __init__(self, freq: float = 100.0, F0: float = 1.0, frame_rows: int = 64):
        super().__init__()
        self.base = float(freq)
        self.F0 = float(F0)
        self.use_3d = False
        self.frame_rows = frame_rows

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.use_3d:
            frame, row, column = positions.unbind(-1)
            positions = torch.stack((row + frame * self.frame_rows, column), dim=-1)
        lowest, highest = int(positions.min()), int(positions.max())
        cos, sin = rope_offset_tables(tokens.shape[-1] // 4, lowest, highest, self.base, self.F0, tokens.device,
                                      tokens.dtype)
        return rotate_by_table(tokens, positions, cos, sin, -lowest)


#: Positions the table of :class:`ClampedTableRoPE2D` covers (a 512-pixel image has at most 32 patches a side).
TABLE_POSITIONS = 32


@upstream_name("RoPE2D")
class SwappedAxesRoPE2D(nn.Module):
    """Real change: rotates the first half of each head by the column x and the second by the row y (the
    spec has y first); the same function only where y == x."""

    def __init__(self, freq: float = 100.0, F0: float = 1.0):
        super().__init__()
        self.base = float(freq)
        self.F0 = float(F0)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        lowest, highest = int(positions.min()), int(positions.max())
        cos, sin = rope_offset_tables(tokens.shape[-1] // 4, lowest, highest, self.base, self.F0, tokens.device,
                                      tokens.dtype)
        return rotate_by_table(tokens, positions.flip(-1), cos, sin, -lowest)


@upstream_name("RoPE2D")
class ClampedTableRoPE2D(nn.Module):
    """Real change: a fixed table for positions 0 .. TABLE_POSITIONS - 1 and positions clamped into it,
    so the spec's function only on grids of up to 32 x 32 patches."""

    def __init__(self, freq: float = 100.0, F0: float = 1.0):
        super().__init__()
        self.base = float(freq)
        self.F0 = float(F0)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_offset_tables(tokens.shape[-1] // 4, 0, TABLE_POSITIONS - 1, self.base, self.F0,
                                      tokens.device, tokens.dtype)
        return rotate_by_table(tokens, positions.clamp(0, TABLE_POSITIONS - 1), cos, sin, 0)


@upstream_name("RoPE2D")
class FirstSamplePositionsRoPE2D(nn.Module):
    """Real change: assumes every sample of the batch has the first sample's positions (true of one
    image size, not of ManyAR batches mixing landscape and portrait samples)."""

    def __init__(self, freq: float = 100.0, F0: float = 1.0):
        super().__init__()
        self.base = float(freq)
        self.F0 = float(F0)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        shared = positions[:1].expand_as(positions)
        lowest, highest = int(shared.min()), int(shared.max())
        cos, sin = rope_offset_tables(tokens.shape[-1] // 4, lowest, highest, self.base, self.F0, tokens.device,
                                      tokens.dtype)
        return rotate_by_table(tokens, shared, cos, sin, -lowest)


# ----------------------------------------------------------------------------------------------
# Attention (spec section 4)
# ----------------------------------------------------------------------------------------------
class _SelfAttentionParts(nn.Module):
    """The spec's Attention constructor (arguments, attributes, children, state_dict keys); no forward."""

    def __init__(self, dim, rope=None, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rope = rope


@upstream_name("Attention")
class SdpaAttention(_SelfAttentionParts):
    """Harmless: ``scaled_dot_product_attention(q, k, v)`` with its default scale Dh^(-1/2); the attention
    dropout module is present but never used (harmless while its p is 0)."""

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv_heads(self.qkv(x), self.num_heads)
        if self.rope is not None:
            q = self.rope(q, xpos)
            k = self.rope(k, xpos)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(merge_heads(out)))


@upstream_name("Attention")
class SdpaScaledAttention(_SelfAttentionParts):
    """Harmless: ``scaled_dot_product_attention`` with an explicit ``scale=self.scale``; also has a helper
    for visualisation, never called by forward, that reads an attribute fastpatch knows nothing of."""

    map_temperature = 1.0  # read by attention_maps only

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv_heads(self.qkv(x), self.num_heads)
        if self.rope is not None:
            q, k = self.rope(q, xpos), self.rope(k, xpos)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj_drop(self.proj(merge_heads(out)))

    def attention_maps(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        """Softmax maps (B, H, N, N) sharpened by ``map_temperature``, for visualisation."""
        q, k, _ = qkv_heads(self.qkv(x), self.num_heads)
        if self.rope is not None:
            q, k = self.rope(q, xpos), self.rope(k, xpos)
        return (scores(q, k, self.scale) / self.map_temperature).softmax(dim=-1)


@upstream_name("Attention")
class ContiguousAttention(_SelfAttentionParts):
    """Harmless: explicit softmax attention with an extra ``.contiguous()`` copy of the heads before merging."""

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv_heads(self.qkv(x), self.num_heads)
        if self.rope is not None:
            q = self.rope(q, xpos)
            k = self.rope(k, xpos)
        attn = self.attn_drop(scores(q, k, self.scale).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).contiguous()  # (B, N, H, Dh)
        return self.proj_drop(self.proj(out.flatten(2)))


@upstream_name("Attention")
class OptionalPositionsAttention(_SelfAttentionParts):
    """Harmless: positions default to None, and the rotation is skipped without them."""

    def forward(self, x: torch.Tensor, xpos: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = qkv_heads(self.qkv(x), self.num_heads)
        if self.rope is not None and xpos is not None:
            q = self.rope(q, xpos)
            k = self.rope(k, xpos)
        attn = self.attn_drop(scores(q, k, self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj(merge_heads(attn @ v)))


@upstream_name("Attention")
class AttentionMapsAttention(_SelfAttentionParts):
    """Real change: returns ``(output, attention maps (B, H, N, N))`` instead of the output alone."""

    def forward(self, x: torch.Tensor, xpos: torch.Tensor):
        q, k, v = qkv_heads(self.qkv(x), self.num_heads)
        if self.rope is not None:
            q, k = self.rope(q, xpos), self.rope(k, xpos)
        attn = self.attn_drop(scores(q, k, self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj(merge_heads(attn @ v))), attn


@upstream_name("Attention")
class MaskedAttention(_SelfAttentionParts):
    """Real change: an extra ``mask`` argument (B, N, N) bool, True where a query may attend to a key."""

    def forward(self, x: torch.Tensor, xpos: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = qkv_heads(self.qkv(x), self.num_heads)
        if self.rope is not None:
            q, k = self.rope(q, xpos), self.rope(k, xpos)
        logits = scores(q, k, self.scale)
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None], float("-inf"))
        attn = self.attn_drop(logits.softmax(dim=-1))
        return self.proj_drop(self.proj(merge_heads(attn @ v)))


@upstream_name("Attention")
class QkNormAttention(_SelfAttentionParts):
    """Real change: qk-norm, a LayerNorm over each head's channels of q and of k (children ``q_norm``,
    ``k_norm``) before the rotation."""

    def __init__(self, dim, rope=None, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__(dim, rope, num_heads, qkv_bias, attn_drop, proj_drop)
        self.q_norm = spec_layer_norm(dim // num_heads)
        self.k_norm = spec_layer_norm(dim // num_heads)

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv_heads(self.qkv(x), self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q, xpos), self.rope(k, xpos)
        attn = self.attn_drop(scores(q, k, self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj(merge_heads(attn @ v)))


@upstream_name("Attention")
class TemperatureAttention(_SelfAttentionParts):
    """Real change: an inference ``temperature`` (1.0 by default, so the spec's function until someone
    sets it) divides the logits."""

    def __init__(self, dim, rope=None, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__(dim, rope, num_heads, qkv_bias, attn_drop, proj_drop)
        self.temperature = 1.0

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv_heads(self.qkv(x), self.num_heads)
        if self.rope is not None:
            q, k = self.rope(q, xpos), self.rope(k, xpos)
        attn = self.attn_drop((scores(q, k, self.scale) / self.temperature).softmax(dim=-1))
        return self.proj_drop(self.proj(merge_heads(attn @ v)))


@upstream_name("Attention")
class HalfRopeInFp32Attention(_SelfAttentionParts):
    """Real change: in float32 runs only, q and k go through the RoPE in float16 (and back); float64 runs
    are the spec's function."""

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv_heads(self.qkv(x), self.num_heads)
        if self.rope is not None:
            if q.dtype == torch.float32:
                q = self.rope(q.half(), xpos).float()
                k = self.rope(k.half(), xpos).float()
            else:
                q = self.rope(q, xpos)
                k = self.rope(k, xpos)
        attn = self.attn_drop(scores(q, k, self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj(merge_heads(attn @ v)))


@upstream_name("Attention")
class HalfRopeAttention(_SelfAttentionParts):
    """Real change: q and k always go through the RoPE in float16, then back to the working dtype."""

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv_heads(self.qkv(x), self.num_heads)
        if self.rope is not None:
            q = self.rope(q.half(), xpos).to(v.dtype)
            k = self.rope(k.half(), xpos).to(v.dtype)
        attn = self.attn_drop(scores(q, k, self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj(merge_heads(attn @ v)))


@upstream_name("Attention")
class HelperTemperatureAttention(_SelfAttentionParts):
    """Real change: forward calls a helper method that divides the logits by ``temperature`` (1.0 until
    set): the attribute read hides one call below forward."""

    def __init__(self, dim, rope=None, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__(dim, rope, num_heads, qkv_bias, attn_drop, proj_drop)
        self.temperature = 1.0

    def probabilities(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.attn_drop((scores(q, k, self.scale) / self.temperature).softmax(dim=-1))

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv_heads(self.qkv(x), self.num_heads)
        if self.rope is not None:
            q, k = self.rope(q, xpos), self.rope(k, xpos)
        return self.proj_drop(self.proj(merge_heads(self.probabilities(q, k) @ v)))


@upstream_name("Attention")
class TrainingScaledAttention(_SelfAttentionParts):
    """Real change in training mode only: halves the logits while training (eval mode is the spec's)."""

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv_heads(self.qkv(x), self.num_heads)
        if self.rope is not None:
            q, k = self.rope(q, xpos), self.rope(k, xpos)
        logits = scores(q, k, self.scale)
        if self.training:
            logits = logits * 0.5
        attn = self.attn_drop(logits.softmax(dim=-1))
        return self.proj_drop(self.proj(merge_heads(attn @ v)))


class DerivedSdpaAttention(reference.Attention):
    """Harmless, named otherwise: derives from fastpatch's eager (spec) Attention and only swaps in SDPA."""

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv_heads(self.qkv(x), self.num_heads)
        if self.rope is not None:
            q, k = self.rope(q, xpos), self.rope(k, xpos)
        return self.proj_drop(self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v, scale=self.scale))))


class DerivedTemperatureAttention(reference.Attention):
    """Real change, named otherwise: derives from fastpatch's eager (spec) Attention and adds a ``temperature``."""

    def __init__(self, dim, rope=None, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__(dim, rope, num_heads, qkv_bias, attn_drop, proj_drop)
        self.temperature = 1.0

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv_heads(self.qkv(x), self.num_heads)
        if self.rope is not None:
            q, k = self.rope(q, xpos), self.rope(k, xpos)
        attn = self.attn_drop((scores(q, k, self.scale) / self.temperature).softmax(dim=-1))
        return self.proj_drop(self.proj(merge_heads(attn @ v)))


# ----------------------------------------------------------------------------------------------
# CrossAttention (spec section 5)
# ----------------------------------------------------------------------------------------------
class _CrossAttentionParts(nn.Module):
    """The spec's CrossAttention constructor (arguments, attributes, children, state_dict keys); no forward."""

    def __init__(self, dim, rope=None, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.projq = nn.Linear(dim, dim, bias=qkv_bias)
        self.projk = nn.Linear(dim, dim, bias=qkv_bias)
        self.projv = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rope = rope


@upstream_name("CrossAttention")
class SdpaCrossAttention(_CrossAttentionParts):
    """Harmless: ``scaled_dot_product_attention`` on (B, H, N, Dh) heads (the right axes); Nq may differ from Nk."""

    def forward(self, query, key, value, qpos, kpos) -> torch.Tensor:
        q = split_heads(self.projq(query), self.num_heads)
        k = split_heads(self.projk(key), self.num_heads)
        v = split_heads(self.projv(value), self.num_heads)
        if self.rope is not None:
            q = self.rope(q, qpos)
            k = self.rope(k, kpos)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj_drop(self.proj(merge_heads(out)))


@upstream_name("CrossAttention")
class OptionalPositionsCrossAttention(_CrossAttentionParts):
    """Harmless: positions default to None, and the rotation is skipped without them."""

    def forward(self, query, key, value, qpos=None, kpos=None) -> torch.Tensor:
        q = split_heads(self.projq(query), self.num_heads)
        k = split_heads(self.projk(key), self.num_heads)
        v = split_heads(self.projv(value), self.num_heads)
        if self.rope is not None and qpos is not None and kpos is not None:
            q = self.rope(q, qpos)
            k = self.rope(k, kpos)
        attn = self.attn_drop(scores(q, k, self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj(merge_heads(attn @ v)))


@upstream_name("CrossAttention")
class HeadsAxisSdpaCrossAttention(_CrossAttentionParts):
    """Real change: hands SDPA (B, N, H, Dh) tensors, so it attends over the heads of each token instead of
    over the keys (and fails when Nq != Nk)."""

    def forward(self, query, key, value, qpos, kpos) -> torch.Tensor:
        q = split_heads(self.projq(query), self.num_heads)
        k = split_heads(self.projk(key), self.num_heads)
        v = split_heads(self.projv(value), self.num_heads)
        if self.rope is not None:
            q = self.rope(q, qpos)
            k = self.rope(k, kpos)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=self.scale)  # (B, N, H, Dh): the wrong axes
        return self.proj_drop(self.proj(out.flatten(2)))


# ----------------------------------------------------------------------------------------------
# Blocks (spec sections 6 to 8)
# ----------------------------------------------------------------------------------------------
class _BlockParts(nn.Module):
    """The spec's Block constructor with fastpatch's eager Attention and Mlp as children; no forward."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 act_layer=nn.GELU, norm_layer=spec_layer_norm, rope=None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = reference.Attention(dim, rope=rope, num_heads=num_heads, qkv_bias=qkv_bias,
                                        attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = reference.DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = reference.Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)


@upstream_name("Block")
class PreNormBlock(_BlockParts):
    """Harmless: the spec's pre-norm block with each normalised input named first."""

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.drop_path(self.attn(y, xpos))
        y = self.norm2(x)
        return x + self.drop_path(self.mlp(y))


@upstream_name("Block")
class NoDropPathBlock(_BlockParts):
    """The spec's block without stochastic depth: forward never calls its ``drop_path`` child, so it is the
    spec's function while drop_path is 0 (an identity), and not in training with drop_path > 0."""

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), xpos)
        return x + self.mlp(self.norm2(x))


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (a parameter) of a residual branch."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


@upstream_name("Block")
class LayerScaleBlock(_BlockParts):
    """Real change: LayerScale children ``ls1``/``ls2`` scale both residual branches."""

    def __init__(self, dim, num_heads, init_values=0.5, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.ls1 = LayerScale(dim, init_values)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), xpos)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


@upstream_name("Block")
class GammaBlock(_BlockParts):
    """Real change: LayerScale as direct parameters ``gamma_1``/``gamma_2``, initialised to 1: the spec's
    function until they are trained, so no probe of the fresh module can see the difference."""

    def __init__(self, dim, num_heads, **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.gamma_1 = nn.Parameter(torch.ones(dim))
        self.gamma_2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), xpos))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


@upstream_name("DecoderBlock")
class MemoryFirstDecoderBlock(nn.Module):
    """Harmless: the spec's decoder block that normalises the memory ``y`` before the self-attention."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 act_layer=nn.GELU, norm_layer=spec_layer_norm, norm_mem=True, rope=None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = reference.Attention(dim, rope=rope, num_heads=num_heads, qkv_bias=qkv_bias,
                                        attn_drop=attn_drop, proj_drop=drop)
        self.cross_attn = reference.CrossAttention(dim, rope=rope, num_heads=num_heads, qkv_bias=qkv_bias,
                                                   attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = reference.DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.norm3 = norm_layer(dim)
        self.mlp = reference.Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.norm_y = norm_layer(dim) if norm_mem else nn.Identity()

    def forward(self, x, y, xpos, ypos):
        memory = self.norm_y(y)
        x = x + self.drop_path(self.attn(self.norm1(x), xpos))
        x = x + self.drop_path(self.cross_attn(self.norm2(x), memory, memory, xpos, ypos))
        x = x + self.drop_path(self.mlp(self.norm3(x)))
        return x, y


# ----------------------------------------------------------------------------------------------
# Patch embeddings (spec section 1)
# ----------------------------------------------------------------------------------------------
class _PatchEmbedParts(nn.Module):
    """The spec's patch-embedding constructor (fastpatch's eager PositionGetter as position generator); no forward."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True):
        super().__init__()
        self.img_size = as_pair(img_size)
        self.patch_size = as_pair(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
        self.position_getter = reference.PositionGetter()


@upstream_name("PositionGetter")
class GridPositionGetter:
    """The spec's position generator (section 2), cached per (rows, columns, device) in ``cache_positions``:
    ``getter(b, h, w, device)`` -> (b, h*w, 2) int64 (y, x) in raster order."""

    def __init__(self):
        self.cache_positions = {}

    def __call__(self, b: int, h: int, w: int, device) -> torch.Tensor:
        key = (h, w, str(device))
        if key not in self.cache_positions:
            rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            self.cache_positions[key] = torch.stack((rows, cols), dim=-1).reshape(h * w, 2)
        return self.cache_positions[key].expand(b, -1, -1).clone()


@upstream_name("PatchEmbedDust3R")
class TruncNormalInitPatchEmbed(_PatchEmbedParts):
    """Harmless: the spec's forward; only ``_init_weights`` (never called by forward, reading an attribute
    fastpatch ignores) differs."""

    init_std = 0.02  # read by _init_weights only

    def _init_weights(self) -> None:
        """Truncated-normal projection weights (std ``init_std``), zero bias."""
        nn.init.trunc_normal_(self.proj.weight, std=self.init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, img: torch.Tensor, **kwargs):
        height, width = img.shape[-2:]
        if height % self.patch_size[0] or width % self.patch_size[1]:
            raise ValueError(f"image {height}x{width} is not a multiple of the patch size {self.patch_size}")
        x = self.proj(img)  # (B, C, Ht, Wt)
        pos = self.position_getter(x.shape[0], x.shape[2], x.shape[3], img.device)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # raster order: token r*Wt + c
        return self.norm(x), pos


@upstream_name("ManyAR_PatchEmbed")
class KaimingInitManyARPatchEmbed(_PatchEmbedParts):
    """Harmless: the spec's ManyAR forward, written one sample at a time; ``_init_weights`` differs."""

    def _init_weights(self) -> None:
        """Kaiming-uniform projection weights, zero bias."""
        nn.init.kaiming_uniform_(self.proj.weight, a=5 ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, img: torch.Tensor, true_shape: torch.Tensor):
        batch, _, height, width = img.shape
        if width < height:
            raise ValueError(f"the batch tensor must be landscape (W >= H), got {height}x{width}")
        if height % self.patch_size[0] or width % self.patch_size[1]:
            raise ValueError(f"image {height}x{width} is not a multiple of the patch size {self.patch_size}")
        if tuple(true_shape.shape) != (batch, 2):
            raise ValueError(f"true_shape must be ({batch}, 2), got {tuple(true_shape.shape)}")
        tokens, positions = [], []
        for sample, (true_height, true_width) in zip(img, true_shape.tolist()):
            if true_height > true_width:  # portrait, stored transposed: embed the un-transposed image
                sample = sample.transpose(-1, -2)
            grid = self.proj(sample[None])  # (1, C, rows, cols)
            tokens.append(grid.flatten(2).transpose(1, 2).to(img.dtype))
            positions.append(self.position_getter(1, grid.shape[2], grid.shape[3], img.device))
        return self.norm(torch.cat(tokens)), torch.cat(positions)


@upstream_name("ManyAR_PatchEmbed")
class LandscapeOnlyManyARPatchEmbed(_PatchEmbedParts):
    """Real change: ignores ``true_shape``, so portrait samples are embedded as stored (transposed)."""

    def forward(self, img: torch.Tensor, true_shape: torch.Tensor):
        x = self.proj(img)
        pos = self.position_getter(x.shape[0], x.shape[2], x.shape[3], img.device)
        return self.norm(x.flatten(2).transpose(1, 2)), pos


@upstream_name("ManyAR_PatchEmbed")
class SquareAsPortraitManyARPatchEmbed(KaimingInitManyARPatchEmbed):
    """Real change: treats square samples as portrait (the spec counts squares as landscape), so a square
    image is embedded transposed."""

    def forward(self, img: torch.Tensor, true_shape: torch.Tensor):
        tokens, positions = [], []
        for sample, (true_height, true_width) in zip(img, true_shape.tolist()):
            if true_height >= true_width:
                sample = sample.transpose(-1, -2)
            grid = self.proj(sample[None])
            tokens.append(grid.flatten(2).transpose(1, 2).to(img.dtype))
            positions.append(self.position_getter(1, grid.shape[2], grid.shape[3], img.device))
        return self.norm(torch.cat(tokens)), torch.cat(positions)

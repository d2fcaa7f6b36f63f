"""Eager reference of VGGT's and π3's qk-norm + RoPE2D attention and blocks, written from the spec
(``/work/shared/spec/vggt.md`` §1-4, §9); no upstream code is used or copied.

What is here (the op-for-op baseline the benchmarks and tests compare with, and the float64 oracle):

* :class:`RotaryPositionEmbedding2D`: VGGT's RoPE2D (spec §2.3): lanes ``0..Dh/2-1`` rotated by the
  row ``y``, the rest by the column ``x``; inside each half lane ``i`` pairs with ``i + Dh/4``
  (rotate-half), ``ω_i = base^(-i/(Dh/4))``. The angle table (indexed by integer position, length
  ``max position + 1`` -- a host sync, as upstream) is built in fp32 and **cast to the tokens' dtype
  before cos/sin**; rows are gathered per token.
* :class:`LayerScale`: ``x * gamma`` (key ``gamma``).
* :class:`VGGTAttention` (VGGT's ``Attention``) and :class:`Pi3Attention` (π3's ``FlashAttentionRope``):
  ``qkv`` linear, per-head LayerNorm ``q_norm`` / ``k_norm`` over ``Dh`` (eps 1e-5, affine) then
  RoPE on q and k, SDPA, ``proj``. π3 casts the normalised q, k back to v's dtype before RoPE.
* :class:`VGGTBlock` (VGGT's ``Block``) and :class:`Pi3Block` (π3's ``BlockRope``): pre-norm
  ``x + ls1(attn(norm1(x), pos))``, ``x + ls2(mlp(norm2(x)))``.
* :func:`grid_positions`: the aggregators' ``(y, x)`` per token (§1.3): special tokens ``(0, 0)``,
  patch ``(r, c)`` at ``(r + 1, c + 1)``, token ``t`` of a multi-frame sequence at ``t mod n``.
* :func:`qknorm_rope_attention_reference`: the float64 oracle of the fused op with the roundings of
  each numerics mode (below).

Numerics modes (spec §2.3, §4), with ``s`` the storage dtype of q, k, v (the qkv linear's output):

* ``"float32"`` -- VGGT under bf16/fp16 autocast: LayerNorm and RoPE in fp32 on ``float(q)``,
  rounded to ``s`` once (where SDPA's autocast casts). Also plain fp32.
* ``"storage"`` -- π3 (any mode) and VGGT run natively in bf16/fp16 without autocast: the LayerNorm
  output is rounded to ``s``; angles fp32 -> ``s`` before cos/sin, cos/sin rounded to ``s``, every
  product and sum rounded to ``s``.

Key names beyond those the spec states (``qkv``, ``q_norm``, ``k_norm``, ``proj``, ``rope``,
``ls1.gamma``, ``ls2.gamma``) follow the DINOv2 block layout the spec describes (§1.2, §3):
``norm1``, ``attn``, ``ls1``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``ls2``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .reference import DropPath, Mlp

__all__ = ["NUMERICS", "RotaryPositionEmbedding2D", "LayerScale", "VGGTAttention", "Pi3Attention", "VGGTBlock",
           "Pi3Block", "grid_positions", "vggt_positions", "rope_inverse_frequencies", "qknorm_rope_attention_reference"]

#: The numerics modes of :func:`qknorm_rope_attention_reference` and :func:`fastpatch.qknorm_rope_attention`.
NUMERICS = ("float32", "storage")


def rope_inverse_frequencies(head_dim: int, base: float = 100.0, device=None) -> torch.Tensor:
    """fp32 ``(Dh/4,)`` frequencies ``1 / base^(2i / (Dh/2))``, computed in fp32 as the spec's tables are."""
    half = head_dim // 2
    return 1.0 / (base ** (torch.arange(0, half, 2, device=device).float() / half))


def grid_positions(tokens: int, height: int, width: int, special: int, device=None) -> torch.Tensor:
    """``(tokens, 2)`` int64 ``(y, x)`` of an aggregator sequence (spec §1.3).

    Frames hold ``n = special + height * width`` tokens: ``special`` tokens at ``(0, 0)``, then the
    patch grid row-major with patch ``(r, c)`` at ``(r + 1, c + 1)``. Token ``t`` takes the position of
    ``t mod n`` (global attention over several frames).

    Raises:
        ValueError: ``tokens`` not a multiple of ``n``, or negative sizes.
    """
    if height <= 0 or width <= 0 or special < 0:
        raise ValueError(f"grid needs height, width > 0 and special >= 0, got {(height, width, special)}")
    per_frame = special + height * width
    if tokens % per_frame != 0:
        raise ValueError(f"{tokens} tokens are not whole frames of {special} + {height}x{width} = {per_frame} tokens")
    index = torch.arange(tokens, device=device) % per_frame - special
    patch = index.clamp(min=0)
    pos = torch.stack((patch // width + 1, patch % width + 1), dim=-1)
    return torch.where((index < 0)[:, None], torch.zeros_like(pos), pos)


def _rotate_half_features(x: torch.Tensor) -> torch.Tensor:
    """``[u1 | u2] -> [-u2 | u1]`` on the last axis (rotate-half pairing)."""
    u1, u2 = x.chunk(2, dim=-1)
    return torch.cat((-u2, u1), dim=-1)


class RotaryPositionEmbedding2D(nn.Module):
    """VGGT's RoPE2D: ``forward(tokens (B, H, N, Dh), positions (B, N, 2) int) -> (B, H, N, Dh)``.

    ``frequency`` is the base (100); the spec defines only ``scaling_factor = 1``. No parameters.
    """

    def __init__(self, frequency: float = 100.0, scaling_factor: float = 1.0):
        super().__init__()
        if scaling_factor != 1.0:
            raise ValueError(f"only scaling_factor=1.0 is specified, got {scaling_factor}")
        self.base_frequency = float(frequency)
        self.scaling_factor = float(scaling_factor)

    def _tables(self, head_dim_half: int, max_position: int, device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        inv = rope_inverse_frequencies(2 * head_dim_half, self.base_frequency, device)  # (Dh/4,) fp32
        angles = torch.arange(max_position + 1, device=device).float()[:, None] * inv[None, :]
        angles = torch.cat((angles, angles), dim=-1).to(dtype)  # cast before cos/sin (spec §2.3)
        return angles.cos(), angles.sin()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        head_dim = tokens.shape[-1]
        if head_dim % 4 != 0:
            raise ValueError(f"RoPE2D needs a head dim divisible by 4, got {head_dim}")
        cos, sin = self._tables(head_dim // 2, int(positions.max()), tokens.device, tokens.dtype)
        out = []
        for axis, half in enumerate(tokens.chunk(2, dim=-1)):
            c = F.embedding(positions[..., axis], cos)[:, None]  # (B, 1, N, Dh/2)
            s = F.embedding(positions[..., axis], sin)[:, None]
            out.append(half * c + _rotate_half_features(half) * s)
        return torch.cat(out, dim=-1)


class LayerScale(nn.Module):
    """``x * gamma`` with a learned ``(dim,)`` vector (not in place)."""

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class VGGTAttention(nn.Module):
    """VGGT's attention: ``forward(x (B, N, C), pos (B, N, 2) int or None) -> (B, N, C)``.

    Keys ``qkv.weight`` (3C, C), ``qkv.bias``, ``q_norm.{weight,bias}`` and ``k_norm.{weight,bias}`` (Dh,)
    when ``qk_norm``, ``proj.weight``, ``proj.bias``. qkv channel ``s*C + h*Dh + j`` is q/k/v ``s``, head
    ``h``, lane ``j``. With ``rope`` None (DINOv2, camera head) ``pos`` is ignored.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, norm_layer=nn.LayerNorm, qk_norm: bool = False,
                 fused_attn: bool = True, rope: Optional[nn.Module] = None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rope = rope

    def _heads(self, x: torch.Tensor):
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def _attend(self, q, k, v, x_shape, attn_mask=None) -> torch.Tensor:
        dropout = self.attn_drop.p if self.training else 0.0
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            out = self.attn_drop(attn.softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(x_shape)))

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self._heads(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        return self._attend(q, k, v, x.shape)


class Pi3Attention(VGGTAttention):
    """π3's ``FlashAttentionRope``: ``forward(x (B, N, C), attn_bias=None, xpos (B, N, 2) or None) -> (B, N, C)``.

    As :class:`VGGTAttention` (same keys), but the normalised q and k are cast to v's dtype before
    RoPE (spec §4), and ``attn_bias`` (added to the scores) is accepted.
    """

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
                xpos: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self._heads(x)
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        if self.rope is not None:
            q, k = self.rope(q, xpos), self.rope(k, xpos)
        return self._attend(q, k, v, x.shape, attn_bias)


class VGGTBlock(nn.Module):
    """VGGT's block: ``forward(x (B, N, C), pos (B, N, 2) or None) -> (B, N, C)``.

    ``x + ls1(attn(norm1(x), pos))`` then ``x + ls2(mlp(norm2(x)))``; LayerScale when ``init_values``
    is given (else identity), GELU-erf MLP of ``mlp_ratio * dim`` hidden units, drop path inactive in eval.
    """

    attn_class = VGGTAttention

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 init_values: Optional[float] = None, drop_path: float = 0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, qk_norm: bool = False, fused_attn: bool = True,
                 rope: Optional[nn.Module] = None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = self.attn_class(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                                    attn_drop=attn_drop, proj_drop=drop, qk_norm=qk_norm, fused_attn=fused_attn,
                                    rope=rope)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, bias=ffn_bias, drop=drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.sample_drop_ratio = drop_path  # VGGT's / π3's name for the block's drop-path rate

    def _attention(self, x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
        return self.attn(x, pos=pos)

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self._attention(self.norm1(x), pos)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class Pi3Block(VGGTBlock):
    """π3's ``BlockRope``: ``forward(x (B, N, C), xpos (B, N, 2) or None) -> (B, N, C)``; attention is
    :class:`Pi3Attention` (qk-norm LN eps stays 1e-5 whatever the block's ``norm_layer``, spec §4)."""

    attn_class = Pi3Attention

    def _attention(self, x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
        return self.attn(x, xpos=pos)

    def forward(self, x: torch.Tensor, xpos: Optional[torch.Tensor] = None) -> torch.Tensor:
        return super().forward(x, xpos)


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` (round-to-nearest-even) and back to ``x``'s dtype."""
    return x.to(dtype).to(x.dtype)


def _oracle_norm_rope(x: torch.Tensor, weight, bias, eps: float, pos: torch.Tensor, base: float, storage,
                      numerics: str) -> torch.Tensor:
    """float64 LN + RoPE of ``x`` (B, H, N, Dh) with the roundings of ``numerics`` for storage dtype ``storage``."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()
    head_dim = x.shape[-1]
    inv = rope_inverse_frequencies(head_dim, base, x.device)  # fp32, as the spec's tables
    angles = pos.float()[:, None, :, :, None] * inv  # (B, 1, N, 2, Dh/4) fp32 products
    quarter = head_dim // 4
    if numerics == "storage":
        y = _round(y, storage)
        angles = angles.to(storage).double()
        cos, sin = _round(angles.cos(), storage), _round(angles.sin(), storage)
    else:
        angles = angles.double()
        cos, sin = angles.cos(), angles.sin()
    a, b = y.unflatten(-1, (2, 2, quarter)).unbind(-2)  # (B, H, N, y/x, Q)
    if numerics == "storage":
        a_new = _round(_round(a * cos, storage) + _round(-b * sin, storage), storage)
        b_new = _round(_round(b * cos, storage) + _round(a * sin, storage), storage)
    else:
        a_new, b_new = a * cos - b * sin, b * cos + a * sin
    return torch.stack((a_new, b_new), dim=-2).flatten(-3)


def qknorm_rope_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                                    q_bias: torch.Tensor, k_weight: torch.Tensor, k_bias: torch.Tensor,
                                    positions: torch.Tensor, *, rope_base: float = 100.0, eps: float = 1e-5,
                                    scale: Optional[float] = None, numerics: str = "float32") -> torch.Tensor:
    """float64 oracle of ``softmax(scale q' k'^T) v`` with ``q' = RoPE(LN_q(q))``, ``k' = RoPE(LN_k(k))``.

    Args:
        q, k, v: ``(B, H, N, Dh)`` in their storage dtype (the rounded inputs the op sees).
        q_weight, q_bias, k_weight, k_bias: ``(Dh,)`` LayerNorm affine parameters.
        positions: ``(B, N, 2)`` integer ``(y, x)``.
        numerics: ``"float32"`` or ``"storage"`` (module docstring); q' and k' are rounded to the
            storage dtype before the float64 attention, as the SDPA they feed sees them.

    Returns:
        ``(B, H, N, Dh)`` float64.
    """
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    storage = q.dtype
    qr = _round(_oracle_norm_rope(q, q_weight, q_bias, eps, positions, rope_base, storage, numerics), storage)
    kr = _round(_oracle_norm_rope(k, k_weight, k_bias, eps, positions, rope_base, storage, numerics), storage)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = qr @ kr.transpose(-2, -1) * scale
    return scores.softmax(-1) @ v.double()


def vggt_positions(batch: int, frames: int, height: int, width: int, special: int = 5, device=None) -> torch.Tensor:
    """``(batch, frames * n, 2)``: :func:`grid_positions` of ``frames`` frames, repeated over the batch."""
    per_frame = special + height * width
    return grid_positions(frames * per_frame, height, width, special, device).expand(batch, -1, -1).contiguous()


"""Eager, op-for-op reference of the DUSt3R ViT, written from ``shared/spec/dust3r-vit.md``.

Two jobs:

* the **eager baseline** the benchmarks compare against (same ops, same order as the original
  model: convolution + flatten + transpose, a separate position grid, RoPE as a separate pass over
  q and k, attention that materialises the N x N score matrix);
* run in **float64**, the **oracle** every test compares against.

Class names, constructor arguments, attributes and ``state_dict`` keys are those of the upstream
code, so a real DUSt3R checkpoint loads into :class:`Dust3RBackbone` and upstream modules can be
compared one to one. Nothing here is fast on purpose; fastpatch's modules subclass these classes
and replace only ``forward``.

Layouts: tokens (B, N, C); heads (B, H, N, Dh) with Dh = C / H; positions (B, N, 2) int64 holding
(y, x) = (row, column) of each token in raster order.
"""
from __future__ import annotations

import collections.abc
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "to_2tuple",
    "PositionGetter",
    "rope2d_frequencies",
    "apply_rope2d",
    "RoPE2D",
    "rope_from_pos_embed",
    "get_2d_sincos_pos_embed",
    "PatchEmbedDust3R",
    "ManyAR_PatchEmbed",
    "PATCH_EMBED_CLASSES",
    "get_patch_embed",
    "DropPath",
    "Mlp",
    "Attention",
    "CrossAttention",
    "Block",
    "DecoderBlock",
    "Dust3RBackbone",
    "DUST3R_CONFIGS",
    "dust3r_backbone",
]


def to_2tuple(value) -> Tuple:
    """``v -> (v, v)`` for scalars; iterables are returned as tuples unchanged."""
    if isinstance(value, collections.abc.Iterable) and not isinstance(value, str):
        return tuple(value)
    return (value, value)


# ----------------------------------------------------------------------------------------------
# Positions and rotary embedding (spec §2, §3)
# ----------------------------------------------------------------------------------------------
class PositionGetter:
    """Integer (y, x) grid positions, cached per (rows, cols, device).

    ``getter(b, h, w, device)`` returns an int64 tensor (b, h*w, 2): token k = (k // w, k % w).
    The (h*w, 2) grid is cached; each call returns a fresh (b, h*w, 2) copy the caller may modify.
    """

    def __init__(self):
        self.cache_positions: Dict[Tuple[int, int, torch.device], torch.Tensor] = {}

    def __call__(self, b: int, h: int, w: int, device) -> torch.Tensor:
        key = (h, w, torch.device(device))
        grid = self.cache_positions.get(key)
        if grid is None:
            rows = torch.arange(h, device=device, dtype=torch.int64)
            cols = torch.arange(w, device=device, dtype=torch.int64)
            grid = torch.cartesian_prod(rows, cols)  # (h*w, 2), raster order, y first
            self.cache_positions[key] = grid
        return grid.repeat(b, 1, 1)


def rope2d_frequencies(quarter: int, base: float, f0: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Angular frequencies ω_j = F0 · base^(−j/Q) for j = 0..Q−1, shape (Q,)."""
    exponents = torch.arange(quarter, device=device, dtype=torch.float64) / quarter
    return (f0 * base ** (-exponents)).to(dtype)


def _rotate_half(block: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (a_j, b_j) = (block[..., j], block[..., j + Q]) by ``angles`` (..., Q)."""
    a, b = block.chunk(2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def apply_rope2d(tokens: torch.Tensor, positions: torch.Tensor, base: float = 100.0, f0: float = 1.0) -> torch.Tensor:
    """2D rotary embedding (spec §3), out of place.

    Args:
        tokens: (B, H, N, Dh), Dh divisible by 4. Channels [Y_a | Y_b | X_a | X_b] of Q = Dh/4 each;
            the first half is rotated by the row y, the second by the column x, channel j paired
            with channel j + Q inside each half.
        positions: (B, N, 2) integer (y, x).
        base, f0: ω_j = f0 · base^(−j/Q).

    Numerics: float64 tokens get float64 angles (the oracle). Other dtypes follow the upstream
    eager path: angles computed in float32, then rounded to the token dtype before cos/sin.

    Returns:
        Rotated tokens, (B, H, N, Dh), same dtype.
    """
    dh = tokens.shape[-1]
    if dh % 4 != 0:
        raise ValueError(f"RoPE2D needs a head dim divisible by 4, got {dh}")
    angle_dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    omega = rope2d_frequencies(dh // 4, base, f0, device=tokens.device, dtype=angle_dtype)
    pos = positions.to(angle_dtype)[:, None, :, :]  # (B, 1, N, 2) broadcast over heads
    theta_y = (pos[..., 0:1] * omega).to(tokens.dtype)  # (B, 1, N, Q)
    theta_x = (pos[..., 1:2] * omega).to(tokens.dtype)
    y_half, x_half = tokens.chunk(2, dim=-1)
    return torch.cat((_rotate_half(y_half, theta_y), _rotate_half(x_half, theta_x)), dim=-1)


class RoPE2D(nn.Module):
    """2D RoPE module: ``RoPE2D(freq=100.0, F0=1.0)(tokens (B,H,N,Dh), positions (B,N,2))``. No parameters."""

    def __init__(self, freq: float = 100.0, F0: float = 1.0):
        super().__init__()
        self.base = float(freq)
        self.F0 = float(F0)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return apply_rope2d(tokens, positions, self.base, self.F0)

    def extra_repr(self) -> str:
        return f"freq={self.base}, F0={self.F0}"


def rope_from_pos_embed(pos_embed: str) -> Optional[RoPE2D]:
    """``"RoPE<base>"`` -> ``RoPE2D(freq=float(base))``; ``"cosine"`` -> None (additive table instead)."""
    if pos_embed == "cosine":
        return None
    if pos_embed.startswith("RoPE"):
        try:
            base = float(pos_embed[len("RoPE"):])
        except ValueError:
            raise ValueError(f"pos_embed={pos_embed!r}: expected 'RoPE<base>' with a numeric base") from None
        return RoPE2D(freq=base)
    raise ValueError(f"unknown pos_embed {pos_embed!r}; expected 'cosine' or 'RoPE<base>' (e.g. 'RoPE100')")


def _sincos_1d(width: int, coords: torch.Tensor) -> torch.Tensor:
    """[sin(p·ω_0..ω_{K-1}), cos(p·ω_0..ω_{K-1})] with K = width/2, ω_k = 10000^(−k/K): (len(coords), width)."""
    k = width // 2
    omega = 10000.0 ** (-torch.arange(k, dtype=torch.float64) / k)
    angles = coords.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: Union[int, Sequence[int]]) -> torch.Tensor:
    """CroCo's fixed cosine table (spec §3, cosine alternative), float32 (h*w, embed_dim).

    Channels [0, C/2) encode the column x, [C/2, C) the row y; tokens in raster order.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"cosine position table needs embed_dim divisible by 4, got {embed_dim}")
    h, w = to_2tuple(grid_size)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    half = embed_dim // 2
    table = torch.cat((_sincos_1d(half, xs.reshape(-1)), _sincos_1d(half, ys.reshape(-1))), dim=1)
    return table.float()


# ----------------------------------------------------------------------------------------------
# Patch embedding (spec §1)
# ----------------------------------------------------------------------------------------------
def _check_image(img: torch.Tensor, in_chans: int, patch_size: Tuple[int, int]) -> None:
    if img.dim() != 4:
        raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(img.shape)}")
    if not img.is_floating_point():
        raise TypeError(f"expected a floating-point image, got {img.dtype}")
    if img.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} image channels, got {img.shape[1]} (shape {tuple(img.shape)})")
    h, w = img.shape[-2:]
    if h % patch_size[0] or w % patch_size[1]:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch_size[0]}x{patch_size[1]}")


class PatchEmbedDust3R(nn.Module):
    """Image to patch tokens with positions: conv (kernel = stride = p), flatten, transpose.

    ``forward(img (B, in_chans, H, W), **kwargs) -> (tokens (B, N, embed_dim), pos (B, N, 2) int64)``
    with N = (H/p)·(W/p) in raster order. H and W must be multiples of p (any size, not only
    ``img_size``); extra keywords such as ``true_shape`` are ignored.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
        self.position_getter = PositionGetter()

    def _init_weights(self) -> None:
        """Initialise ``proj`` like a Linear layer on flattened patches (Xavier-uniform), as CroCo models expect."""
        weight = self.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))

    def forward(self, img: torch.Tensor, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        _check_image(img, self.proj.in_channels, self.patch_size)
        x = self.proj(img)  # (B, C, Ht, Wt)
        pos = self.position_getter(x.shape[0], x.shape[2], x.shape[3], img.device)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        return self.norm(x), pos


class ManyAR_PatchEmbed(PatchEmbedDust3R):
    """Patch embedding for batches mixing landscape and (stored transposed) portrait images.

    ``forward(img (B, 3, H, W) with W >= H, true_shape (B, 2) of (height, width))``. A sample whose
    true height exceeds its true width is portrait: it is stored transposed, so it is embedded as
    the un-transposed (W x H) image and gets a (W/p rows x H/p cols) position grid.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True):
        self.embed_dim = embed_dim
        super().__init__(img_size, patch_size, in_chans, embed_dim, norm_layer, flatten)

    def forward(self, img: torch.Tensor, true_shape: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        _check_image(img, self.proj.in_channels, self.patch_size)
        b, _, h, w = img.shape
        if h > w:
            raise ValueError(f"ManyAR_PatchEmbed expects a landscape batch tensor (W >= H), got {h}x{w}")
        if tuple(true_shape.shape) != (b, 2):
            raise ValueError(f"true_shape must have shape ({b}, 2), got {tuple(true_shape.shape)}")
        ht, wt = h // self.patch_size[0], w // self.patch_size[1]
        landscape = true_shape[:, 1] >= true_shape[:, 0]
        portrait = ~landscape
        tokens = img.new_zeros((b, ht * wt, self.embed_dim))
        pos = torch.zeros((b, ht * wt, 2), dtype=torch.int64, device=img.device)
        # The buffer keeps the image's dtype (under autocast the projection comes back in another one).
        tokens[landscape] = self.proj(img[landscape]).flatten(2).transpose(1, 2).to(tokens.dtype)
        tokens[portrait] = self.proj(img[portrait].swapaxes(-1, -2)).flatten(2).transpose(1, 2).to(tokens.dtype)
        pos[landscape] = self.position_getter(1, ht, wt, img.device)
        pos[portrait] = self.position_getter(1, wt, ht, img.device)
        return self.norm(tokens), pos


PATCH_EMBED_CLASSES = {"PatchEmbedDust3R": PatchEmbedDust3R, "ManyAR_PatchEmbed": ManyAR_PatchEmbed}


def get_patch_embed(patch_embed_cls: str, img_size, patch_size: int, enc_embed_dim: int) -> PatchEmbedDust3R:
    """Build ``patch_embed_cls`` (a class name, see :data:`PATCH_EMBED_CLASSES`) with in_chans=3."""
    if patch_embed_cls not in PATCH_EMBED_CLASSES:
        raise ValueError(f"unknown patch_embed_cls {patch_embed_cls!r}; expected one of {sorted(PATCH_EMBED_CLASSES)}")
    return PATCH_EMBED_CLASSES[patch_embed_cls](img_size, patch_size, 3, enc_embed_dim)


# ----------------------------------------------------------------------------------------------
# Transformer blocks (spec §4 – §8)
# ----------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth: in training, zero whole samples with probability ``drop_prob`` and rescale."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if self.scale_by_keep and keep > 0.0:
            mask.div_(keep)
        return x * mask


class Mlp(nn.Module):
    """fc1 -> act -> dropout -> fc2 -> dropout; (B, N, in) -> (B, N, out)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, bias=True, drop=0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        bias1, bias2 = to_2tuple(bias)
        drop1, drop2 = to_2tuple(drop)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias1)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop1)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2)
        self.drop2 = nn.Dropout(drop2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, H, N, C/H)."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, Dh) -> (B, N, H·Dh), head-major channels."""
    b, h, n, dh = x.shape
    return x.transpose(1, 2).reshape(b, n, h * dh)


def _explicit_attention(q, k, v, scale: float, attn_drop: nn.Module) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v materialising the (B, H, Nq, Nk) matrix in the working dtype."""
    attn = (q @ k.transpose(-2, -1)) * scale
    return attn_drop(attn.softmax(dim=-1)) @ v


class Attention(nn.Module):
    """Multi-head self-attention with optional 2D RoPE on q and k.

    ``forward(x (B, N, C), xpos (B, N, 2)) -> (B, N, C)``. Keys: ``qkv`` (3C x C), ``proj``.
    """

    def __init__(self, dim, rope=None, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rope = rope

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, Dh) each
        if self.rope is not None:
            q = self.rope(q, xpos)
            k = self.rope(k, xpos)
        out = _explicit_attention(q, k, v, self.scale, self.attn_drop)
        return self.proj_drop(self.proj(_merge_heads(out)))


class CrossAttention(nn.Module):
    """Multi-head cross-attention with optional 2D RoPE (query positions and key positions).

    ``forward(query (B, Nq, C), key (B, Nk, C), value (B, Nk, C), qpos (B, Nq, 2), kpos (B, Nk, 2))``
    -> (B, Nq, C). Keys: ``projq``, ``projk``, ``projv``, ``proj``.
    """

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

    def forward(self, query, key, value, qpos, kpos) -> torch.Tensor:
        q = _split_heads(self.projq(query), self.num_heads)
        k = _split_heads(self.projk(key), self.num_heads)
        v = _split_heads(self.projv(value), self.num_heads)
        if self.rope is not None:
            q = self.rope(q, qpos)
            k = self.rope(k, kpos)
        out = _explicit_attention(q, k, v, self.scale, self.attn_drop)
        return self.proj_drop(self.proj(_merge_heads(out)))


class Block(nn.Module):
    """Pre-norm encoder block: x + Attn(LN1 x, pos), then x + MLP(LN2 x). ``forward(x (B,N,C), xpos)``."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, rope=None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, rope=rope, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), xpos))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DecoderBlock(nn.Module):
    """Decoder block: self-attention, cross-attention to the other view's tokens ``y``, MLP.

    ``forward(x (B, Nx, C), y (B, Ny, C), xpos, ypos) -> (x_new, y)`` with ``y`` returned untouched.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, norm_mem=True, rope=None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, rope=rope, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                              proj_drop=drop)
        self.cross_attn = CrossAttention(dim, rope=rope, num_heads=num_heads, qkv_bias=qkv_bias,
                                         attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.norm3 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.norm_y = norm_layer(dim) if norm_mem else nn.Identity()

    def forward(self, x, y, xpos, ypos) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x + self.drop_path(self.attn(self.norm1(x), xpos))
        memory = self.norm_y(y)
        x = x + self.drop_path(self.cross_attn(self.norm2(x), memory, memory, xpos, ypos))
        x = x + self.drop_path(self.mlp(self.norm3(x)))
        return x, y


# ----------------------------------------------------------------------------------------------
# DUSt3R backbone (spec §9, §10)
# ----------------------------------------------------------------------------------------------
def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


class Dust3RBackbone(nn.Module):
    """DUSt3R's ViT encoder + twin decoders, without the downstream heads.

    Its ``state_dict`` keys are exactly the backbone keys of a DUSt3R checkpoint (everything but
    ``downstream_head1/2.*``): ``mask_token``, ``patch_embed.*``, ``enc_blocks.*``, ``enc_norm.*``,
    ``decoder_embed.*``, ``dec_blocks.*``, ``dec_norm.*``, ``dec_blocks2.*``.

    ``forward(img1, img2, true_shape1=None, true_shape2=None)`` takes (B, 3, H, W) images and returns
    two lists of ``dec_depth + 1`` tensors: [encoder output (B, N, enc_dim), decoder block outputs
    (B, N, dec_dim)...], the last passed through ``dec_norm``.
    """

    def __init__(self, img_size=224, patch_size=16, enc_embed_dim=768, enc_depth=12, enc_num_heads=12,
                 dec_embed_dim=512, dec_depth=8, dec_num_heads=16, mlp_ratio=4, norm_im2_in_dec=True,
                 pos_embed="RoPE100", patch_embed_cls="PatchEmbedDust3R"):
        super().__init__()
        if not pos_embed.startswith("RoPE"):
            raise ValueError(f"Dust3RBackbone needs pos_embed='RoPE<base>', got {pos_embed!r}")
        self.rope = rope_from_pos_embed(pos_embed)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_embed_dim))
        self.patch_embed = get_patch_embed(patch_embed_cls, img_size, patch_size, enc_embed_dim)
        self.enc_blocks = nn.ModuleList(
            Block(enc_embed_dim, enc_num_heads, mlp_ratio, qkv_bias=True, norm_layer=_layer_norm, rope=self.rope)
            for _ in range(enc_depth)
        )
        self.enc_norm = _layer_norm(enc_embed_dim)
        self.decoder_embed = nn.Linear(enc_embed_dim, dec_embed_dim, bias=True)
        self.dec_blocks = nn.ModuleList(
            DecoderBlock(dec_embed_dim, dec_num_heads, mlp_ratio, qkv_bias=True, norm_layer=_layer_norm,
                         norm_mem=norm_im2_in_dec, rope=self.rope)
            for _ in range(dec_depth)
        )
        self.dec_norm = _layer_norm(dec_embed_dim)
        self.dec_blocks2 = nn.ModuleList(
            DecoderBlock(dec_embed_dim, dec_num_heads, mlp_ratio, qkv_bias=True, norm_layer=_layer_norm,
                         norm_mem=norm_im2_in_dec, rope=self.rope)
            for _ in range(dec_depth)
        )
        self.dec_blocks2.load_state_dict(self.dec_blocks.state_dict())

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        """Load a backbone state dict; one without ``dec_blocks2.*`` gets a copy of ``dec_blocks.*``."""
        if not any(key.startswith("dec_blocks2.") for key in state_dict):
            state_dict = dict(state_dict)
            for key, value in list(state_dict.items()):
                if key.startswith("dec_blocks."):
                    state_dict["dec_blocks2." + key[len("dec_blocks."):]] = value
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def encode(self, img: torch.Tensor, true_shape: Optional[torch.Tensor] = None):
        """(B, 3, H, W) -> (features (B, N, enc_dim) after ``enc_norm``, positions (B, N, 2))."""
        if true_shape is None:  # filled on the device: no host-to-device copy, so CUDA graphs can capture it
            true_shape = torch.full((img.shape[0], 2), img.shape[-2], dtype=torch.int64, device=img.device)
            true_shape[:, 1] = img.shape[-1]
        x, pos = self.patch_embed(img, true_shape=true_shape)
        for block in self.enc_blocks:
            x = block(x, pos)
        return self.enc_norm(x), pos

    def decode(self, f1, pos1, f2, pos2) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Twin decoders; each block of a stream reads the other stream's previous output."""
        out1, out2 = [f1], [f2]
        g1, g2 = self.decoder_embed(f1), self.decoder_embed(f2)
        for block1, block2 in zip(self.dec_blocks, self.dec_blocks2):
            g1, g2 = block1(g1, g2, pos1, pos2)[0], block2(g2, g1, pos2, pos1)[0]
            out1.append(g1)
            out2.append(g2)
        out1[-1] = self.dec_norm(out1[-1])
        out2[-1] = self.dec_norm(out2[-1])
        return out1, out2

    def forward(self, img1, img2, true_shape1=None, true_shape2=None):
        if img1.shape[-2:] == img2.shape[-2:]:
            shapes = None if true_shape1 is None or true_shape2 is None else torch.cat((true_shape1, true_shape2))
            feats, pos = self.encode(torch.cat((img1, img2)), shapes)
            (f1, f2), (pos1, pos2) = feats.chunk(2), pos.chunk(2)
        else:
            f1, pos1 = self.encode(img1, true_shape1)
            f2, pos2 = self.encode(img2, true_shape2)
        return self.decode(f1, pos1, f2, pos2)


_VIT_LARGE_BASE = dict(patch_size=16, enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, dec_embed_dim=768,
                       dec_depth=12, dec_num_heads=12, mlp_ratio=4, pos_embed="RoPE100")

DUST3R_CONFIGS: Dict[str, dict] = {
    "DUSt3R_ViTLarge_BaseDecoder_224": dict(_VIT_LARGE_BASE, img_size=(224, 224)),
    "DUSt3R_ViTLarge_BaseDecoder_512": dict(_VIT_LARGE_BASE, img_size=(512, 512)),
}


def dust3r_backbone(config: str = "DUSt3R_ViTLarge_BaseDecoder_512", **overrides) -> Dust3RBackbone:
    """Build a :class:`Dust3RBackbone` from a named config (:data:`DUST3R_CONFIGS`), keyword overrides applied."""
    if config not in DUST3R_CONFIGS:
        raise ValueError(f"unknown DUSt3R config {config!r}; expected one of {sorted(DUST3R_CONFIGS)}")
    return Dust3RBackbone(**dict(DUST3R_CONFIGS[config], **overrides))

"""Stand-ins for VGGT's and π3's classes, written from the spec (vggt.md §1-4) and named like theirs,
for the patching tests. Independent of :mod:`fastpatch.reference_vggt` on purpose (a second reading
of the spec); VGGT's and π3's own code is never used.
"""
import torch
import torch.nn.functional as F
from torch import nn

from fastpatch.reference import RoPE2D  # croco's RoPE2D stands for π3's (spec §4: same formula, base 100)


class RotaryPositionEmbedding2D(nn.Module):
    def __init__(self, frequency=100.0, scaling_factor=1.0):
        super().__init__()
        self.base_frequency = frequency
        self.scaling_factor = scaling_factor

    def forward(self, tokens, positions):
        half = tokens.shape[-1] // 2
        inv = 1.0 / (self.base_frequency ** (torch.arange(0, half, 2, device=tokens.device).float() / half))
        out = []
        for axis, part in enumerate(tokens.chunk(2, dim=-1)):
            angles = positions[..., axis].float()[..., None] * inv  # (B, N, half/2)
            angles = torch.cat((angles, angles), dim=-1).to(tokens.dtype)[:, None]
            u1, u2 = part.chunk(2, dim=-1)
            out.append(part * angles.cos() + torch.cat((-u2, u1), dim=-1) * angles.sin())
        return torch.cat(out, dim=-1)


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """VGGT's: forward(x, pos=None)."""

    def __init__(self, dim, num_heads=8, qk_norm=False, rope=None, fused_attn=True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale, self.fused_attn = self.head_dim ** -0.5, fused_attn
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)
        self.rope = rope

    def forward(self, x, pos=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            x = self.attn_drop((q * self.scale @ k.transpose(-2, -1)).softmax(-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class FlashAttentionRope(Attention):
    """π3's: forward(x, attn_bias=None, xpos=None); normalised q, k cast to v's dtype before RoPE."""

    def forward(self, x, attn_bias=None, xpos=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        if self.rope is not None:
            q, k = self.rope(q, xpos), self.rope(k, xpos)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class DinoMlp(nn.Module):
    """DINOv2's layout: fc1, act, fc2 and one dropout, used after act and after fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act = nn.Linear(dim, hidden), nn.GELU()
        self.fc2, self.drop = nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """VGGT's (and its DINOv2's): forward(x, pos=None); a drop-path rate ``sample_drop_ratio`` that only
    matters in training (stochastic depth there, as DINOv2's blocks)."""

    attn_class = Attention

    def __init__(self, dim, num_heads, qk_norm=False, rope=None, init_values=0.01, eps=1e-5, mlp_class=Mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = self.attn_class(dim, num_heads, qk_norm=qk_norm, rope=rope)
        self.ls1, self.drop_path1 = LayerScale(dim, init_values), nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = mlp_class(dim, 4 * dim)
        self.ls2, self.drop_path2 = LayerScale(dim, init_values), nn.Identity()
        self.sample_drop_ratio = 0.0

    def forward(self, x, pos=None):
        if self.training and self.sample_drop_ratio > 0.0:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), pos=pos)))
            return x + self.drop_path1(self.ls2(self.mlp(self.norm2(x))))
        x = x + self.ls1(self.attn(self.norm1(x), pos=pos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class MemEffAttention(Attention):
    """DINOv2's encoder attention as VGGT carries it: forward(x, attn_bias=None, pos=None), no RoPE."""

    def forward(self, x, attn_bias=None, pos=None):
        return super().forward(x)


class NestedTensorBlock(Block):
    """DINOv2's encoder block as VGGT carries it: forward(x_or_x_list)."""

    attn_class = MemEffAttention

    def forward(self, x_or_x_list):
        return super().forward(x_or_x_list)


class PlainAttention(nn.Module):
    """π3's DINOv2 encoder attention: qkv and proj, no qk-norm, no rope attribute; forward(x, attn_bias=None)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.attn_drop = nn.Linear(dim, 3 * dim), nn.Dropout(0.0)
        self.proj, self.proj_drop = nn.Linear(dim, dim), nn.Dropout(0.0)

    def forward(self, x, attn_bias=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = self.attn_drop((q * self.scale @ k.transpose(-2, -1)).softmax(-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


PlainAttention.__name__ = PlainAttention.__qualname__ = "Attention"


class PlainBlock(nn.Module):
    """π3's DINOv2 encoder block: forward(x), pre-norm, plain ViT."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), PlainAttention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


PlainBlock.__name__ = PlainBlock.__qualname__ = "Block"


class BlockRope(Block):
    """π3's: forward(x, xpos=None), LN eps 1e-6."""

    attn_class = FlashAttentionRope

    def __init__(self, dim, num_heads, qk_norm=False, rope=None, init_values=0.01):
        super().__init__(dim, num_heads, qk_norm, rope, init_values, eps=1e-6)

    def forward(self, x, xpos=None):
        if self.training and self.sample_drop_ratio > 0.0:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), xpos=xpos)))
            return x + self.drop_path1(self.ls2(self.mlp(self.norm2(x))))
        x = x + self.ls1(self.attn(self.norm1(x), xpos=xpos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RopeBeforeNormAttention(Attention):
    """Not VGGT's function: RoPE before qk-norm (the probe must refuse it)."""

    def forward(self, x, pos=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(self.rope(q, pos)), self.k_norm(self.rope(k, pos))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


RopeBeforeNormAttention.__name__ = RopeBeforeNormAttention.__qualname__ = "Attention"


class TinyAggregator(nn.Module):
    """DINOv2-style blocks (no qk-norm, no RoPE: VGGT's ``Block`` and ``NestedTensorBlock``, π3's plain ViT
    block), then alternating frame / global qk-norm RoPE blocks, and a camera-head block (no RoPE):
    VGGT's layout at toy width. forward(tokens (S, n, C), pos (S, n, 2))."""

    def __init__(self, dim=128, heads=2, depth=1, block=Block, rope=None):
        super().__init__()
        self.patch_blocks = nn.ModuleList([Block(dim, heads, eps=1e-6), NestedTensorBlock(dim, heads, eps=1e-6),
                                           PlainBlock(dim, heads)])
        rope = rope or RotaryPositionEmbedding2D(100.0)
        self.frame_blocks = nn.ModuleList([block(dim, heads, qk_norm=True, rope=rope) for _ in range(depth)])
        self.global_blocks = nn.ModuleList([block(dim, heads, qk_norm=True, rope=rope) for _ in range(depth)])
        self.camera_block = Block(dim, heads)

    def forward(self, tokens, pos):
        frames, n, dim = tokens.shape
        for blk in self.patch_blocks:
            tokens = blk(tokens)
        for frame, glob in zip(self.frame_blocks, self.global_blocks):
            tokens = frame(tokens, pos)
            tokens = glob(tokens.reshape(1, frames * n, dim), pos.reshape(1, frames * n, 2)).reshape(frames, n, dim)
        return self.camera_block(tokens[:, :1])

"""Drop-in VGGT / π3 qk-norm + RoPE2D attention and LayerScale blocks running :func:`qknorm_rope_attention`.

Each class subclasses its eager twin in :mod:`fastpatch.reference_vggt` (same constructor arguments,
attributes and ``state_dict`` keys); only ``forward`` differs. When the module has LayerNorm ``q_norm`` /
``k_norm`` over ``Dh`` and a ``rope``, q, k, v stay strided views of the qkv projection and LayerNorm,
RoPE and attention run in one call (fused in the Triton kernels); otherwise (DINOv2 and camera-head
attention: no qk-norm, no RoPE; or an ``attn_bias``) the eager forward runs unchanged.

Numerics follow the module replaced: π3's casts the normalised q, k to v's dtype before RoPE
(``"storage"``); VGGT's keeps them in the LayerNorm's output dtype -- fp32 under autocast or with fp32
norm weights (``"float32"``), the tokens' dtype when the model runs natively in bf16/fp16 (``"storage"``).
The RoPE base is read from the ``rope`` module (``base_frequency``, ``base``, ``frequency`` or ``freq``;
100 if it has none) -- :func:`fastpatch.patch_model` verifies the result by probe.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import reference_vggt
from ..ops.linear_onednn import linear
from ..ops.qknorm_rope_attention import qknorm_rope_attention
from .attention import project
from .plain_children import (inactive_dropout, is_plain, known_layer_scale_class, plain_identity, plain_linear,
                             plain_mlp)

__all__ = ["VGGTAttention", "FlashAttentionRope", "VGGTBlock", "BlockRope", "rope_base_of", "fusable"]

_BASE_NAMES = ("base_frequency", "base", "frequency", "freq")


def rope_base_of(rope: nn.Module) -> float:
    """The RoPE2D frequency base of a rope module (first numeric attribute of :data:`_BASE_NAMES`, else 100)."""
    for name in _BASE_NAMES:
        value = getattr(rope, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 100.0


def fusable(module: nn.Module) -> bool:
    """True when ``module`` has LayerNorm ``q_norm`` / ``k_norm`` (affine, over the head dim, one eps) and a ``rope``."""
    q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
    head_dim = module.qkv.out_features // 3 // module.num_heads if isinstance(module.qkv, nn.Linear) else None
    return (getattr(module, "rope", None) is not None and getattr(q_norm, "eps", 0) == getattr(k_norm, "eps", 1)
            and all(
        type(n) is nn.LayerNorm and n.elementwise_affine and n.bias is not None
        and tuple(n.normalized_shape) == (head_dim,) for n in (q_norm, k_norm)))


def _attention_heads(module: nn.Module, x: torch.Tensor, pos: Optional[torch.Tensor], storage: bool) -> torch.Tensor:
    """The attention of ``x`` (B, N, C) before ``proj``: heads merged, (B, N, C) (a view of token-major memory)."""
    batch, tokens, channels = x.shape
    if pos is None:
        raise ValueError("this attention applies RoPE2D: pass positions (B, N, 2)")
    heads = module.num_heads
    qkv = project(module.qkv, x).unflatten(-1, (3, heads, channels // heads))
    q_norm, k_norm = module.q_norm, module.k_norm
    if not storage:  # VGGT: the LN output dtype decides (fp32 under autocast or with fp32 weights)
        storage = (not torch.is_autocast_enabled(x.device.type)) and q_norm.weight.dtype == qkv.dtype
    dropout = module.attn_drop.p if module.training else 0.0
    scale = None if getattr(module, "fused_attn", True) else module.scale
    out = qknorm_rope_attention(qkv, q_norm_weight=q_norm.weight, q_norm_bias=q_norm.bias,
                                k_norm_weight=k_norm.weight, k_norm_bias=k_norm.bias, positions=pos,
                                rope_base=rope_base_of(module.rope), eps=q_norm.eps, scale=scale,
                                numerics="storage" if storage else "float32", dropout_p=dropout)
    return out.transpose(1, 2).reshape(batch, tokens, channels)


def _attend(module: nn.Module, x: torch.Tensor, pos: Optional[torch.Tensor], storage: bool) -> torch.Tensor:
    return module.proj_drop(module.proj(_attention_heads(module, x, pos, storage)))


class VGGTAttention(reference_vggt.VGGTAttention):
    """VGGT's attention, fused: ``forward(x (B, N, C), pos (B, N, 2) int or None) -> (B, N, C)``.

    Keys as :class:`fastpatch.reference_vggt.VGGTAttention` (``qkv``, ``q_norm``, ``k_norm``, ``proj``).
    """

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not fusable(self):
            return super().forward(x, pos)
        return _attend(self, x, pos, storage=False)

    def heads(self, x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`forward` before ``proj``: ``(B, N, C)``, for a :func:`fusable` module."""
        return _attention_heads(self, x, pos, storage=False)


class FlashAttentionRope(reference_vggt.Pi3Attention):
    """π3's attention, fused: ``forward(x (B, N, C), attn_bias=None, xpos (B, N, 2) or None) -> (B, N, C)``."""

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
                xpos: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attn_bias is not None or not fusable(self):
            return super().forward(x, attn_bias, xpos)
        return _attend(self, x, xpos, storage=True)

    def heads(self, x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`forward` (no ``attn_bias``) before ``proj``: ``(B, N, C)``, for a :func:`fusable` module."""
        return _attention_heads(self, x, pos, storage=True)


def _plain_layer_scale(module: nn.Module) -> bool:
    """A plain ``nn.Identity``, or a plain :class:`fastpatch.reference_vggt.LayerScale` or known upstream
    LayerScale (VGGT's, π3's) that is not in place, holding only a ``(dim,)`` ``gamma``."""
    if plain_identity(module):
        return True
    cls = type(module)
    if not (cls is reference_vggt.LayerScale or known_layer_scale_class(cls)) or not is_plain(module, cls):
        return False
    gamma = module._parameters.get("gamma")
    return (getattr(module, "inplace", False) is False and gamma is not None and gamma.dim() == 1
            and tuple(module._parameters) == ("gamma",) and not module._modules and not module._buffers)


def _scaled_residual(layer: nn.Module, x: torch.Tensor, layer_scale: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """``residual + layer_scale(layer(x))`` for a :func:`_plain_layer_scale`: the add fused into the GEMM
    without LayerScale, else one ``addcmul`` pass (``x * gamma`` then the add, in one op)."""
    if plain_identity(layer_scale):
        return project(layer, x, residual=residual)
    return torch.addcmul(residual, project(layer, x), layer_scale.gamma)


class VGGTBlock(reference_vggt.VGGTBlock):
    """VGGT's block with fused attention: ``forward(x (B, N, C), pos (B, N, 2) or None) -> (B, N, C)``.

    Keys: ``norm1``, ``attn.{qkv,q_norm,k_norm,proj}``, ``ls1.gamma``, ``norm2``, ``mlp.{fc1,fc2}``, ``ls2.gamma``.
    ``sample_drop_ratio`` (the ``drop_path`` rate, VGGT's attribute) must be 0 in training: stochastic
    depth raises ``NotImplementedError``.

    When every child is exactly what the block's forward assumes (:meth:`fusable`), the forward reads
    their parameters: the qkv projection and the MLP through :func:`fastpatch.ops.linear_onednn.linear`
    (GELU in the fc1 GEMM on CPU), each LayerScale and residual add in one ``addcmul``. Otherwise, and
    under ``torch.compile``, the children are called as modules.
    """

    attn_class = VGGTAttention

    def fusable(self) -> bool:
        """Children exactly as built: this block's attention class (qk-norm + RoPE, plain ``proj``, inactive
        ``proj_drop``), plain LayerScales or identities, identity drop paths, a plain GELU MLP."""
        attn = self.attn
        return (plain_identity(self.drop_path1) and plain_identity(self.drop_path2)
                and is_plain(attn, self.attn_class) and fusable(attn) and plain_linear(attn.proj)
                and inactive_dropout(attn.proj_drop) and _plain_layer_scale(self.ls1)
                and _plain_layer_scale(self.ls2) and plain_mlp(self.mlp))

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        drop_ratio = getattr(self, "sample_drop_ratio", 0.0)  # absent in a block that has no stochastic depth
        if self.training and drop_ratio > 0.0:
            # VGGT's and π3's blocks run stochastic depth of their own kind there (per-batch subsets above
            # 0.1): another function, so it is refused rather than computed differently.
            raise NotImplementedError(f"{type(self).__name__}: stochastic depth in training (sample_drop_ratio="
                                      f"{drop_ratio}) is not supported; set it to 0 or call eval()")
        if torch.compiler.is_compiling() or pos is None or not self.fusable():
            return super().forward(x, pos)
        x = _scaled_residual(self.attn.proj, self.attn.heads(self.norm1(x), pos), self.ls1, x)
        hidden = linear(self.norm2(x), self.mlp.fc1.weight, self.mlp.fc1.bias, activation="gelu")
        return _scaled_residual(self.mlp.fc2, hidden, self.ls2, x)


class BlockRope(reference_vggt.Pi3Block, VGGTBlock):
    """π3's block with fused attention: ``forward(x (B, N, C), xpos (B, N, 2) or None) -> (B, N, C)``; keys
    and fusion as :class:`VGGTBlock`."""

    attn_class = FlashAttentionRope

    def forward(self, x: torch.Tensor, xpos: Optional[torch.Tensor] = None) -> torch.Tensor:
        return VGGTBlock.forward(self, x, xpos)

"""Drop-in Mlp, Block and DecoderBlock (spec sections 6 to 8).

The blocks subclass their eager twins in :mod:`fastpatch.reference` (same constructor arguments,
attributes, ``state_dict`` keys, initialisation and forward) and swap the class of their attention
submodules for fastpatch's :class:`~fastpatch.modules.attention.Attention` /
:class:`~fastpatch.modules.attention.CrossAttention`, which add no state. :class:`Mlp` is the
reference class itself.

Fused forward: when every child is exactly what upstream's block holds (checked per call by
:mod:`fastpatch.modules.plain_children`: a fastpatch attention, plain ``nn.Linear`` projections, an
upstream-code ``Mlp`` with an exact ``nn.GELU`` and inactive dropouts, ``drop_path`` an
``nn.Identity``, no hooks anywhere), the blocks read the linear layers' parameters and run
:func:`fastpatch.ops.linear_onednn.linear`: on CPU float32 inference that is oneDNN with the GELU
fused into ``fc1`` and the residual adds fused into ``proj`` and ``fc2``; otherwise the same plain
torch ops as upstream's forward (autograd works; ``residual + out`` is upstream's ``x + out``).
Under ``torch.compile`` and for any other children the blocks run upstream's forward, calling their
children as modules.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .. import reference
from ..ops.linear_onednn import linear
from ..reference import Mlp
from .attention import Attention, CrossAttention, project
from .plain_children import inactive_dropout, is_plain, plain_identity, plain_linear, plain_mlp

__all__ = ["Mlp", "Block", "DecoderBlock"]


def _use_class(module: nn.Module, cls: type) -> None:
    """Turn a built reference ``module`` into ``cls``, a forward-only subclass of its class."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} is not a subclass of {type(module).__name__}")
    module.__class__ = cls


def _plain_attention(attn: nn.Module, cls: type) -> bool:
    """``attn`` is exactly fastpatch's ``cls`` with a plain ``proj`` and an inactive ``proj_drop``."""
    return is_plain(attn, cls) and plain_linear(attn.proj) and inactive_dropout(attn.proj_drop)


def _mlp_residual(mlp: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + fc2(gelu(fc1(x)))`` for a :func:`plain_mlp` ``mlp``; ``x`` and the result ``(B, N, C)``."""
    hidden = linear(x, mlp.fc1.weight, mlp.fc1.bias, activation="gelu")
    return linear(hidden, mlp.fc2.weight, mlp.fc2.bias, residual=residual)


class Block(reference.Block):
    """Pre-norm encoder block ``forward(x (B, N, C), xpos (B, N, 2)) -> (B, N, C)`` with fastpatch attention.

    Keys: ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _use_class(self.attn, Attention)

    def fusable(self) -> bool:
        """Whether :meth:`forward` may read the children's parameters (see the module docstring)."""
        return (plain_identity(self.drop_path) and _plain_attention(self.attn, Attention)
                and plain_mlp(self.mlp))

    def forward(self, x: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or not self.fusable():
            return super().forward(x, xpos)
        x = project(self.attn.proj, self.attn.attend(self.norm1(x), xpos), residual=x)
        return _mlp_residual(self.mlp, self.norm2(x), x)


class DecoderBlock(reference.DecoderBlock):
    """Decoder block ``forward(x (B, Nx, C), y (B, Ny, C), xpos, ypos) -> (x_new, y)`` with fastpatch attention.

    Keys: ``norm1``, ``attn.{qkv,proj}``, ``cross_attn.{projq,projk,projv,proj}``, ``norm2``, ``norm3``,
    ``mlp.{fc1,fc2}``, ``norm_y`` (when ``norm_mem``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _use_class(self.attn, Attention)
        _use_class(self.cross_attn, CrossAttention)

    def fusable(self) -> bool:
        """Whether :meth:`forward` may read the children's parameters (see the module docstring)."""
        return (plain_identity(self.drop_path) and _plain_attention(self.attn, Attention)
                and _plain_attention(self.cross_attn, CrossAttention) and plain_mlp(self.mlp))

    def forward(self, x: torch.Tensor, y: torch.Tensor, xpos: torch.Tensor,
                ypos: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling() or not self.fusable():
            return super().forward(x, y, xpos, ypos)
        x = project(self.attn.proj, self.attn.attend(self.norm1(x), xpos), residual=x)
        memory = self.norm_y(y)
        x = project(self.cross_attn.proj, self.cross_attn.attend(self.norm2(x), memory, memory, xpos, ypos),
                    residual=x)
        return _mlp_residual(self.mlp, self.norm3(x), x), y

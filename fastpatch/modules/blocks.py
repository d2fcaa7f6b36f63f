"""Drop-in Mlp, Block and DecoderBlock (spec sections 6 to 8).

The blocks subclass their eager twins in :mod:`fastpatch.reference` (same constructor arguments,
attributes, ``state_dict`` keys, initialisation and forward) and swap the class of their attention
submodules for fastpatch's :class:`~fastpatch.modules.attention.Attention` /
:class:`~fastpatch.modules.attention.CrossAttention`, which add no state and replace only
``forward``. LayerNorm, GELU MLP, residuals, dropout and drop-path are plain torch ops either way, so
:class:`Mlp` is the reference class itself.
"""
from __future__ import annotations

from torch import nn

from .. import reference
from ..reference import Mlp
from .attention import Attention, CrossAttention

__all__ = ["Mlp", "Block", "DecoderBlock"]


def _use_class(module: nn.Module, cls: type) -> None:
    """Turn a built reference ``module`` into ``cls``, a forward-only subclass of its class."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} is not a subclass of {type(module).__name__}")
    module.__class__ = cls


class Block(reference.Block):
    """Pre-norm encoder block ``forward(x (B, N, C), xpos (B, N, 2)) -> (B, N, C)`` with fastpatch attention.

    Keys: ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _use_class(self.attn, Attention)


class DecoderBlock(reference.DecoderBlock):
    """Decoder block ``forward(x (B, Nx, C), y (B, Ny, C), xpos, ypos) -> (x_new, y)`` with fastpatch attention.

    Keys: ``norm1``, ``attn.{qkv,proj}``, ``cross_attn.{projq,projk,projv,proj}``, ``norm2``, ``norm3``,
    ``mlp.{fc1,fc2}``, ``norm_y`` (when ``norm_mem``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _use_class(self.attn, Attention)
        _use_class(self.cross_attn, CrossAttention)

"""Drop-in patch-embedding modules: upstream's constructor arguments, attributes and state_dict
keys (``proj.weight`` (E, C_in, p, p), ``proj.bias`` (E,)), forward through :func:`fastpatch.ops.patch_embed.patch_embed`.

The constructors, parameters and the ``position_getter`` attribute come from the eager classes
of :mod:`fastpatch.reference`; only ``forward`` differs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import reference
from ..ops.patch_embed import patch_embed

__all__ = ["PatchEmbedDust3R", "ManyAR_PatchEmbed", "PATCH_EMBED_CLASSES", "get_patch_embed"]


class PatchEmbedDust3R(reference.PatchEmbedDust3R):
    """Fused patch embedding: ``forward(img (B, 3, H, W), **kwargs) -> (tokens (B, N, E), pos (B, N, 2) int64)``.

    H and W must be multiples of the patch size (any size, portrait included); ``true_shape`` and
    other keywords are ignored. With ``flatten=False`` tokens come back as (B, E, H/p, W/p). Under
    autocast the tokens are in the autocast dtype, as upstream's ``conv2d`` returns them.
    """

    def forward(self, img: torch.Tensor, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens, pos = patch_embed(img, self.proj.weight, self.proj.bias, self.patch_size)
        if not self.flatten:
            grid = (img.shape[-2] // self.patch_size[0], img.shape[-1] // self.patch_size[1])
            tokens = tokens.transpose(1, 2).unflatten(2, grid)
        return self.norm(tokens), pos


class ManyAR_PatchEmbed(reference.ManyAR_PatchEmbed):
    """Fused ManyAR patch embedding: ``forward(img (B, 3, H, W) with W >= H, true_shape (B, 2))``.

    Samples whose true_shape has height > width are stored transposed and embedded un-transposed,
    inside one kernel launch (see :func:`fastpatch.ops.patch_embed.patch_embed`). ``true_shape``
    may stay on the CPU while the image is on the GPU, as dust3r's inference and training loops
    leave it. Tokens come back in the image's dtype, also under autocast (upstream writes the
    projection into a buffer of that dtype), so an fp32 encoder's residual stream stays fp32.
    """

    def forward(self, img: torch.Tensor, true_shape: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens, pos = patch_embed(img, self.proj.weight, self.proj.bias, self.patch_size, true_shape, many_ar=True)
        return self.norm(tokens.to(img.dtype)), pos


PATCH_EMBED_CLASSES = {"PatchEmbedDust3R": PatchEmbedDust3R, "ManyAR_PatchEmbed": ManyAR_PatchEmbed}


def get_patch_embed(patch_embed_cls: str, img_size, patch_size: int, enc_embed_dim: int) -> reference.PatchEmbedDust3R:
    """Build the fused ``patch_embed_cls`` (a name in :data:`PATCH_EMBED_CLASSES`) with in_chans=3.

    Raises:
        ValueError: an unknown class name (the message lists the valid ones).
    """
    if patch_embed_cls not in PATCH_EMBED_CLASSES:
        raise ValueError(f"unknown patch_embed_cls {patch_embed_cls!r}; expected one of {sorted(PATCH_EMBED_CLASSES)}")
    return PATCH_EMBED_CLASSES[patch_embed_cls](img_size, patch_size, 3, enc_embed_dim)

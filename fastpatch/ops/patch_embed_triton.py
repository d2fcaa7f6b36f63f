"""Triton path of the patch embedding as ``torch.library`` custom ops with autograd.

Ops (namespace ``fastpatch``), each with a fake (meta) implementation so ``torch.compile``
traces through them without graph breaks:

* ``fastpatch::patch_embed_fwd(img, weight, bias, patch_size, portrait) -> (tokens, pos)``
* ``fastpatch::patch_embed_grad_params(grad_tokens, img, weight, patch_size, portrait) -> (grad_weight, grad_bias)``
* ``fastpatch::patch_embed_grad_image(grad_tokens, img, weight, patch_size, portrait) -> grad_img``

Shapes and layouts are those of :mod:`fastpatch.launchers.patch_embed`: img (B, C_in, Hi, Wi) any
strides, weight (E, C_in, p, p), bias (E,), portrait ``None`` or (B,) bool, tokens (B, N, E),
pos (B, N, 2) int64. The backward launches the image-gradient kernel only when the image
requires grad. Inputs are assumed validated by :func:`fastpatch.ops.patch_embed.patch_embed`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..launchers.patch_embed import patch_embed_forward, patch_embed_grad_image, patch_embed_grad_params
from .direct_launch import launch_directly

__all__ = ["patch_embed_triton"]


@torch.library.custom_op("fastpatch::patch_embed_fwd", mutates_args=())
def _patch_embed_fwd(img: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, patch_size: int,
                     portrait: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return patch_embed_forward(img, weight, bias, patch_size, portrait)


@_patch_embed_fwd.register_fake
def _patch_embed_fwd_fake(img, weight, bias, patch_size, portrait):
    batch, _, height, width = img.shape
    num_tokens = (height // patch_size) * (width // patch_size)
    tokens = img.new_empty((batch, num_tokens, weight.shape[0]))
    pos = img.new_empty((batch, num_tokens, 2), dtype=torch.int64)
    return tokens, pos


@torch.library.custom_op("fastpatch::patch_embed_grad_params", mutates_args=())
def _patch_embed_grad_params(grad_tokens: torch.Tensor, img: torch.Tensor, weight: torch.Tensor, patch_size: int,
                             portrait: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return patch_embed_grad_params(grad_tokens, img, weight, patch_size, portrait)


@_patch_embed_grad_params.register_fake
def _patch_embed_grad_params_fake(grad_tokens, img, weight, patch_size, portrait):
    return torch.empty_like(weight, memory_format=torch.contiguous_format), weight.new_empty((weight.shape[0],))


@torch.library.custom_op("fastpatch::patch_embed_grad_image", mutates_args=())
def _patch_embed_grad_image(grad_tokens: torch.Tensor, img: torch.Tensor, weight: torch.Tensor, patch_size: int,
                            portrait: Optional[torch.Tensor]) -> torch.Tensor:
    return patch_embed_grad_image(grad_tokens, img, weight, patch_size, portrait)


@_patch_embed_grad_image.register_fake
def _patch_embed_grad_image_fake(grad_tokens, img, weight, patch_size, portrait):
    return torch.empty_like(img, memory_format=torch.preserve_format)


def _setup_context(ctx, inputs, output) -> None:
    img, weight, _, patch_size, portrait = inputs
    ctx.save_for_backward(img, weight, portrait)
    ctx.patch_size = patch_size


def _backward(ctx, grad_tokens: torch.Tensor, grad_pos: Optional[torch.Tensor]):
    img, weight, portrait = ctx.saved_tensors
    grad_img = grad_weight = grad_bias = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_weight, grad_bias = _patch_embed_grad_params(grad_tokens, img, weight, ctx.patch_size, portrait)
    if ctx.needs_input_grad[0]:
        grad_img = _patch_embed_grad_image(grad_tokens, img, weight, ctx.patch_size, portrait)
    return grad_img, grad_weight, grad_bias, None, None


_patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)


def patch_embed_triton(img: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, patch_size: int,
                       portrait: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton patch embedding (``fastpatch::patch_embed_fwd``), differentiable.

    Returns tokens (B, N, E) contiguous in ``img.dtype`` and pos (B, N, 2) int64.
    """
    if launch_directly(img, weight, bias, portrait):  # nothing records this call: skip the custom-op dispatch
        return patch_embed_forward(img, weight, bias, patch_size, portrait)
    return _patch_embed_fwd(img, weight, bias, patch_size, portrait)

"""Host launchers of the patch-embedding kernels: allocate outputs, pick the config, launch.

Inputs are assumed validated (:mod:`fastpatch.ops.patch_embed` does that). Shared arguments:

* ``img``: (B, C_in, Hi, Wi), any strides (NCHW, channels-last, sliced views), float32 /
  float16 / bfloat16. Hi and Wi are multiples of ``patch_size``.
* ``weight``: (E, C_in, p, p) and ``bias``: (E,), same dtype and device as ``img``.
* ``portrait``: ``None`` (every sample landscape: PatchEmbedDust3R) or a (B,) bool tensor on the
  image's device, True where a ManyAR sample is stored transposed (true height > true width).
  It is read inside the kernels; nothing here synchronises with the device.

Every launch runs under :func:`fastpatch.launchers.device.launch_device` of the image's device, and
a launch whose grid would be empty (B = 0) is not made. fp32 products use TF32 exactly when
``torch.backends.cudnn.allow_tf32`` is set, as the ``conv2d`` this op replaces would (read at each
call; the interpreter computes them in fp32 either way).

Token m = b * N + n with N = (Hi / p) * (Wi / p); see :mod:`fastpatch.kernels.patch_embed`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

import torch

from ..kernels.patch_embed import patch_embed_fwd_kernel, patch_embed_grad_image_kernel, patch_embed_grad_weight_kernel
from ..kernels.patch_embed_configs import PatchEmbedConfig, patch_embed_config
from .config_override import ConfigOverrides, check_tile_config
from .device import launch_device
from .grid import cdiv
from .interpreter import INTERPRETED
from .precision import conv_dot_precision

__all__ = ["patch_embed_forward", "patch_embed_grad_params", "patch_embed_grad_image", "override_config"]

#: (device, dtype, embed dim, patch, ManyAR, dot precision) -> (config, launch keywords): built once each.
_LAUNCH_KEYWORDS: Dict[Tuple[torch.device, torch.dtype, int, int, bool, str], Tuple[PatchEmbedConfig, dict]] = {}
#: Configs given by :func:`override_config`, by (device, dtype, embed dim); entering or leaving one empties
#: ``_LAUNCH_KEYWORDS``.
_OVERRIDES = ConfigOverrides(_LAUNCH_KEYWORDS)


@contextmanager
def override_config(config: PatchEmbedConfig, device: torch.device, dtype: torch.dtype,
                    embed_dim: int) -> Iterator[None]:
    """Inside the block, launches for images of ``dtype`` on ``device`` (the tensors' own device:
    ``cuda:0``, not ``cuda``) with ``embed_dim`` output channels use ``config`` instead of the table's
    entry, for all three kernels (tuning sweeps: ``bench/sweep_patch_embed.py``). Not thread-safe.

    Raises:
        ValueError: a block size that is not a power of two >= 16, a warp count that is not a power of
            two <= 16, or ``num_stages < 1``.
    """
    check_tile_config("patch_embed", {"block_m": config.block_m, "block_n": config.block_n,
                                      "block_k": config.block_k}, config.num_warps, config.num_stages)
    with _OVERRIDES.override((device, dtype, embed_dim), config):
        yield


def _launch_keywords(device: torch.device, dtype: torch.dtype, embed_dim: int, patch_size: int, many_ar: bool,
                     precision: str) -> Tuple[PatchEmbedConfig, dict]:
    """The config (:func:`override_config`'s, else the table's for the device's capability class; the
    interpreter: the sm_80 row) and the constexpr / launch keywords of every kernel."""
    config = _OVERRIDES.get((device, dtype, embed_dim))
    if config is None:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        config = patch_embed_config(embed_dim, dtype, capability)
    return config, dict(PATCH=patch_size, MANY_AR=many_ar, UPCAST=INTERPRETED, DOT_PRECISION=precision,
                        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                        num_warps=config.num_warps, num_stages=config.num_stages)


def _launch_options(img: torch.Tensor, weight: torch.Tensor, patch_size: int, portrait: Optional[torch.Tensor]):
    """Config, the constexpr/launch keywords (cached) and the geometry arguments every kernel shares."""
    batch, _, height, width = img.shape
    embed_dim, in_chans = weight.shape[:2]
    key = (img.device, img.dtype, embed_dim, patch_size, portrait is not None, conv_dot_precision(img.dtype))
    cached = _LAUNCH_KEYWORDS.get(key)
    if cached is None:
        cached = _LAUNCH_KEYWORDS[key] = _launch_keywords(*key)
    config, constexprs = cached
    grid_h, grid_w = height // patch_size, width // patch_size
    num_tokens = grid_h * grid_w
    geometry = (batch * num_tokens, num_tokens, grid_h, grid_w, embed_dim, in_chans * patch_size * patch_size)
    return config, constexprs, geometry


def patch_embed_forward(img: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, patch_size: int,
                        portrait: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Tokens and positions of ``img`` in one launch (none for an empty batch).

    Returns:
        tokens: (B, N, E) contiguous, ``img.dtype``; token n = y * grid_cols + x in raster order
        of the sample's true grid.
        pos: (B, N, 2) int64 contiguous, (y, x) per token.
    """
    config, constexprs, geometry = _launch_options(img, weight, patch_size, portrait)
    total_tokens, num_tokens, _, _, embed_dim, patch_pixels = geometry
    weight_2d = weight.reshape(embed_dim, patch_pixels)
    tokens = torch.empty((img.shape[0], num_tokens, embed_dim), device=img.device, dtype=img.dtype)
    pos = torch.empty((img.shape[0], num_tokens, 2), device=img.device, dtype=torch.int64)
    if total_tokens == 0:
        return tokens, pos
    grid = (cdiv(total_tokens, config.block_m), cdiv(embed_dim, config.block_n))
    with launch_device(img.device):
        patch_embed_fwd_kernel[grid](
            img, weight_2d, bias, img if portrait is None else portrait, tokens, pos,
            *geometry,
            *img.stride(),
            *weight_2d.stride(),
            **constexprs,
        )
    return tokens, pos


def patch_embed_grad_params(grad_tokens: torch.Tensor, img: torch.Tensor, weight: torch.Tensor, patch_size: int,
                            portrait: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the projection parameters (zeros, without a launch, for an empty batch).

    Args:
        grad_tokens: (B, N, E), any strides, ``img.dtype``.

    Returns:
        grad_weight: (E, C_in, p, p) contiguous, grad_bias: (E,), both ``weight.dtype``.
    """
    config, constexprs, geometry = _launch_options(img, weight, patch_size, portrait)
    total_tokens, _, _, _, embed_dim, patch_pixels = geometry
    if total_tokens == 0:
        return (torch.zeros_like(weight, memory_format=torch.contiguous_format),
                torch.zeros((embed_dim,), device=weight.device, dtype=weight.dtype))
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    grad_bias = torch.empty((embed_dim,), device=weight.device, dtype=weight.dtype)
    grid = (cdiv(embed_dim, config.block_n), cdiv(patch_pixels, config.block_k))
    with launch_device(img.device):
        patch_embed_grad_weight_kernel[grid](
            img, grad_tokens, img if portrait is None else portrait, grad_weight, grad_bias,
            *geometry,
            *img.stride(),
            *grad_tokens.stride(),
            **constexprs,
        )
    return grad_weight, grad_bias


def patch_embed_grad_image(grad_tokens: torch.Tensor, img: torch.Tensor, weight: torch.Tensor, patch_size: int,
                           portrait: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gradient of the image (only its shape, layout and dtype are used; no launch for an empty batch).

    Args:
        grad_tokens: (B, N, E), any strides, ``img.dtype``.

    Returns:
        grad_img: shaped like ``img``, same memory format when ``img`` is dense (else contiguous NCHW).
    """
    config, constexprs, geometry = _launch_options(img, weight, patch_size, portrait)
    total_tokens, _, _, _, embed_dim, patch_pixels = geometry
    weight_2d = weight.reshape(embed_dim, patch_pixels)
    grad_img = torch.empty_like(img, memory_format=torch.preserve_format)
    if total_tokens == 0:
        return grad_img
    grid = (cdiv(total_tokens, config.block_m), cdiv(patch_pixels, config.block_k))
    with launch_device(img.device):
        patch_embed_grad_image_kernel[grid](
            grad_tokens, weight_2d, img if portrait is None else portrait, grad_img,
            *geometry,
            *grad_img.stride(),
            *grad_tokens.stride(),
            *weight_2d.stride(),
            **constexprs,
        )
    return grad_img

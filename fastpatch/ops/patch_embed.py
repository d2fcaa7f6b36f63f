"""Public patch embedding: ``tokens, pos = patch_embed(img, weight, bias, patch_size, true_shape, many_ar)``.

This file validates the inputs (before any work; no host synchronisation on accelerators) and
picks the implementation with :func:`fastpatch.backend.decide`:

* ``"triton"``: the fused kernels behind the custom ops of :mod:`fastpatch.ops.patch_embed_triton`
  (CUDA, or CPU under the Triton interpreter);
* ``"torch"``: :mod:`fastpatch.ops.patch_embed_torch` (reshape/permute + ``addmm``).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple, Union

import torch

from ..backend import decide
from ..kernels.patch_embed_configs import DTYPES as TRITON_DTYPES  # a plain table: no triton import
from ..launchers.device import capturing_cuda_graph
from ..triton_available import imported_once
from .patch_embed_torch import patch_embed_torch

__all__ = ["patch_embed"]

TORCH_DTYPES = TRITON_DTYPES + (torch.float64,)

@imported_once
def _triton_op():
    """The Triton custom op (:func:`fastpatch.ops.patch_embed_triton.patch_embed_triton`), imported on
    the first Triton call (``import fastpatch`` works without triton), then held: no import per call."""
    from .patch_embed_triton import patch_embed_triton

    return patch_embed_triton


def _square_patch(patch_size: Union[int, Sequence[int]], weight: torch.Tensor) -> int:
    sizes = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
    if len(sizes) != 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ValueError(f"patch_size must be a positive int or a pair of them, got {patch_size!r}")
    if sizes[0] != sizes[1]:
        raise ValueError(f"only square patches are supported, got patch_size {sizes}")
    if tuple(weight.shape[2:]) != sizes:
        raise ValueError(f"weight kernel {tuple(weight.shape[2:])} does not match patch_size {sizes}")
    return sizes[0]


def _check_tensors(img: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Types, ranks and shapes (dtypes are checked after the autocast cast, by :func:`_check_dtypes`)."""
    for name, t in (("img", img), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if img.dim() != 4:
        raise ValueError(f"img must be 4-D (B, C, H, W), got shape {tuple(img.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (embed_dim, C, p, p), got shape {tuple(weight.shape)}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if weight.shape[1] != img.shape[1]:
        raise ValueError(f"img has {img.shape[1]} channels but weight expects {weight.shape[1]} "
                         f"(img shape {tuple(img.shape)})")


def _check_dtypes(img: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    if not img.is_floating_point():
        raise TypeError(f"img must have a floating dtype, got {img.dtype}")
    if img.dtype not in TORCH_DTYPES:
        raise TypeError(f"img dtype {img.dtype} is not supported; use float32, float16, bfloat16 or float64")
    if weight.dtype != img.dtype or bias.dtype != img.dtype:
        raise TypeError(f"img, weight and bias must share a dtype, got {img.dtype}, {weight.dtype}, {bias.dtype}")


def _check_grid(img: torch.Tensor, p: int) -> None:
    height, width = img.shape[-2:]
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")


def _portrait_flags(img: torch.Tensor, true_shape: Optional[torch.Tensor]) -> torch.Tensor:
    """(B,) bool on the image's device: True where the ManyAR sample is portrait (height > width).

    ``true_shape`` may be on the image's device or on the CPU while the image is elsewhere (dust3r
    moves a batch's views to the GPU but leaves ``true_shape`` on the CPU). Values on the CPU are
    checked against the batch tensor (on the host, a few microseconds) and the flags computed from
    them are copied to the image's device without blocking. Values on an accelerator are not
    read: that would synchronise with the device.

    While a CUDA graph is being captured, a CPU ``true_shape`` raises ``RuntimeError``: the graph
    would replay that copy from a host buffer freed after the capture (garbage flags, or an error
    from torch versions that refuse pageable copies in a capture), and could never see new values.
    On the image's device it is read inside the graph, so replays follow its current values.
    """
    batch, _, height, width = img.shape
    if height > width:
        raise ValueError(f"ManyAR expects a landscape batch tensor (W >= H), got {height}x{width}")
    if not isinstance(true_shape, torch.Tensor):
        raise TypeError(f"ManyAR needs true_shape, a (B, 2) integer tensor of (height, width); got {type(true_shape).__name__}")
    if tuple(true_shape.shape) != (batch, 2):
        raise ValueError(f"true_shape must have shape ({batch}, 2), got {tuple(true_shape.shape)}")
    if true_shape.is_floating_point() or true_shape.is_complex() or true_shape.dtype == torch.bool:
        raise TypeError(f"true_shape must hold integers, got {true_shape.dtype}")
    on_host = true_shape.device.type == "cpu"
    if true_shape.device != img.device and not on_host:
        raise ValueError(f"true_shape must be on the image's device ({img.device}) or on the CPU, "
                         f"got {true_shape.device}")
    if on_host and capturing_cuda_graph(img.device):
        raise RuntimeError(f"ManyAR true_shape is on the CPU while a CUDA graph is being captured on {img.device}: "
                           "the graph would replay a copy of freed host memory and never see new values; "
                           "pass true_shape on the image's device (a static input of the graph)")
    if on_host and not torch.compiler.is_compiling():
        _check_true_shape_values(true_shape, height, width)
    portrait = true_shape[:, 0] > true_shape[:, 1]
    if portrait.device != img.device:
        portrait = portrait.to(img.device, non_blocking=True)
    return portrait


def _check_true_shape_values(true_shape: torch.Tensor, height: int, width: int) -> None:
    """Every row must be (H, W) (landscape, stored as is) or (W, H) (portrait, stored transposed)."""
    rows = true_shape.tolist()
    if set(map(tuple, rows)) <= {(height, width), (width, height)}:
        return
    bad = [i for i, row in enumerate(rows) if tuple(row) not in ((height, width), (width, height))]
    raise ValueError(f"true_shape rows {bad} ({[rows[i] for i in bad]}) do not match the {height}x{width} "
                     "batch tensor: a landscape sample must be (H, W), a portrait one (W, H)")


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts ``conv2d``'s inputs to on ``device_type``, or None where it is off.

    Devices without autocast (``meta``) are left alone: asking them raises in torch.
    """
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _casts(t: torch.Tensor, dtype: Optional[torch.dtype]) -> bool:
    """Whether autocast to ``dtype`` casts ``t``: floating tensors other than float64 (those and
    non-floating ones are kept)."""
    return dtype is not None and t.is_floating_point() and t.dtype != torch.float64


def _autocast(img: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtype: Optional[torch.dtype]):
    """Cast as autocast casts ``conv2d``'s inputs when it is on (``dtype``, from :func:`_autocast_dtype`)."""
    if dtype is None:
        return img, weight, bias
    return tuple(t.to(dtype) if _casts(t, dtype) else t for t in (img, weight, bias))


def patch_embed(img: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, patch_size: Union[int, Sequence[int]],
                true_shape: Optional[torch.Tensor] = None, many_ar: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Patch tokens and their grid positions (spec sections 1 and 2), differentiable.

    Args:
        img: (B, C_in, Hi, Wi) float32/float16/bfloat16, any strides; Hi and Wi multiples of p;
            B may be 0. float64 runs on the torch path (with a warning where the Triton backend
            was selected).
        weight: (E, C_in, p, p), the stride-p convolution weight; bias: (E,). Same dtype and
            device as img; under autocast, any floating dtypes, which are cast as for ``conv2d``
            (to the autocast dtype, float64 excepted).
        patch_size: p, an int or a pair (p, p).
        true_shape: (B, 2) integer (height, width) per sample; read only when ``many_ar``. On the
            image's device, or on the CPU (its values are then checked on the host and the
            portrait flags copied to the image's device without blocking).
        many_ar: ManyAR semantics: samples with height > width are stored transposed in ``img``
            (which must then have Wi >= Hi) and are embedded un-transposed.

    Returns:
        tokens: (B, N, E) contiguous, img dtype (the autocast dtype under autocast),
            N = (Hi/p) * (Wi/p); token n is the patch at (n // cols, n % cols) of the sample's
            true grid (cols = Wi/p, or Hi/p for portrait).
        pos: (B, N, 2) int64 holding (y, x) per token.
        With B = 0 both are empty and no kernel is launched; weight and bias gradients are zeros.

    Raises:
        TypeError: non-tensor inputs, integer or unsupported dtypes, mismatched dtypes.
        ValueError: wrong ranks/shapes/channels, sizes not multiples of p, img/weight/bias on
            different devices, true_shape on a device other than the image's or the CPU, a
            portrait ManyAR batch tensor, true_shape of the wrong shape or values.
        RuntimeError: a ManyAR true_shape on the CPU while a CUDA graph is being captured (put it
            on the image's device).
    """
    _check_tensors(img, weight, bias)
    p = _square_patch(patch_size, weight)
    _check_grid(img, p)
    cast_to = _autocast_dtype(img.device.type)
    # Decided before the dtype and ManyAR checks (device errors first), on the dtype the image will have
    # after autocast; raises for img, weight and bias on different devices. Its warning waits for the checks.
    decision = decide("patch_embed", img, weight, bias, dtype=cast_to if _casts(img, cast_to) else img.dtype)
    img, weight, bias = _autocast(img, weight, bias, cast_to)
    _check_dtypes(img, weight, bias)
    portrait = _portrait_flags(img, true_shape) if many_ar else None
    if decision.backend == "triton":
        return _triton_op()(img, weight, bias, p, portrait)
    if decision.fallback:
        warnings.warn(f"fastpatch: {decision.reason}; this patch embedding runs on the torch path", RuntimeWarning,
                      stacklevel=2)
    return patch_embed_torch(img, weight, bias, p, portrait)

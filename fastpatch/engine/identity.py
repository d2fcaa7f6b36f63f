"""What one image of a pair is, and when two views show the same image.

A view is a dust3r image dict: ``img`` a ``(B, C, H, W)`` floating tensor (``B`` is 1 for the output
of dust3r's ``load_images``), ``true_shape`` the ``(B, 2)`` integer ``(height, width)`` of each row
(a numpy array as ``load_images`` leaves it, or a tensor; the image's own ``(H, W)`` when missing),
and any other entries (``idx``, ``instance``...), which the engine carries through untouched.

Two views share encoder features only when they hold the *same tensor object* in the same state and
the same true shape: the key is the tensor's ``id`` and storage pointer, its version counter (bumped
by every in-place write), its shape, strides, dtype and device, and the true-shape values. The
``instance`` label never enters the key, so two different images that carry one label are encoded
separately, and an image written in place is encoded again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Optional, Tuple

import torch

__all__ = ["ImageView", "image_view", "tensor_identity", "version_of"]


def version_of(t: torch.Tensor) -> Optional[int]:
    """``t``'s version counter (bumped by in-place writes); ``None`` for inference-mode tensors, which have none."""
    try:
        return t._version
    except RuntimeError:
        return None


def tensor_identity(t: torch.Tensor) -> Tuple[Hashable, ...]:
    """Hashable identity of ``t`` in its current state: object, storage, version, layout."""
    return (id(t), t.data_ptr(), t.storage_offset(), version_of(t), tuple(t.shape), tuple(t.stride()), t.dtype,
            str(t.device))


@dataclass(frozen=True, eq=False)
class ImageView:
    """One side of a pair: the image tensor, its per-row true shapes on the CPU, and its key.

    ``img``: ``(B, C, H, W)`` as given (any device); ``true_shape``: ``(B, 2)`` integer CPU tensor
    (dtype as given: int32 from numpy for dust3r); ``key``: hashable identity (see module docstring).
    """

    img: torch.Tensor
    true_shape: torch.Tensor
    key: Tuple[Hashable, ...]

    @property
    def rows(self) -> int:
        return self.img.shape[0]

    @property
    def true_shape_rows(self) -> Tuple[Tuple[int, int], ...]:
        return tuple(tuple(row) for row in self.true_shape.tolist())


def _true_shape(view: Mapping[str, Any], img: torch.Tensor, where: str) -> torch.Tensor:
    shape = view.get("true_shape")
    batch = img.shape[0]
    if shape is None:
        return torch.tensor([list(img.shape[-2:])] * batch, dtype=torch.int64)
    if not isinstance(shape, torch.Tensor):
        try:
            shape = torch.as_tensor(shape)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{where}['true_shape'] must be a (B, 2) integer array or tensor, got "
                            f"{type(view['true_shape']).__name__}") from exc
    if shape.is_floating_point() or shape.is_complex() or shape.dtype == torch.bool:
        raise TypeError(f"{where}['true_shape'] must hold integers, got {shape.dtype}")
    if tuple(shape.shape) != (batch, 2):
        raise ValueError(f"{where}['true_shape'] must have shape ({batch}, 2) for an image of shape "
                         f"{tuple(img.shape)}, got {tuple(shape.shape)}")
    return shape.cpu()


def image_view(view: Any, where: str) -> ImageView:
    """Validate a dust3r image dict and return its :class:`ImageView`.

    Raises:
        TypeError: ``view`` is not a mapping, ``img`` is not a floating tensor, ``true_shape`` is not integer.
        ValueError: ``img`` is not 4-D, ``true_shape`` does not have shape ``(B, 2)``.
    """
    if not isinstance(view, Mapping):
        raise TypeError(f"{where} must be a dust3r image dict with an 'img' tensor, got {type(view).__name__}")
    img = view.get("img")
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{where}['img'] must be a torch.Tensor, got {type(img).__name__}")
    if img.dim() != 4:
        raise ValueError(f"{where}['img'] must have shape (B, C, H, W), got {tuple(img.shape)}")
    if not img.is_floating_point():
        raise TypeError(f"{where}['img'] must be a floating tensor, got {img.dtype}")
    true_shape = _true_shape(view, img, where)
    key = tensor_identity(img) + tuple(tuple(row) for row in true_shape.tolist())
    return ImageView(img=img, true_shape=true_shape, key=key)

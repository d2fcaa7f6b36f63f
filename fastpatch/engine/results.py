"""The returned dict of dust3r's ``inference``: ``view1``, ``view2``, ``pred1``, ``pred2``, ``loss``.

Layout (what dust3r returns, on the CPU, in pair order):

* all first images of the pairs have one size and all second images one size: every tensor (and
  numpy array, as a tensor) is concatenated along dim 0 over the pairs: ``view1['img']``
  ``(P, 3, H, W)``, ``view1['true_shape']`` ``(P, 2)``, ``pred1['pts3d']`` ``(P, H, W, 3)``...;
* otherwise every tensor is a list of per-row tensors (``(3, H, W)``, ``(2,)``, ``(H, W, 3)``...);
* numbers and strings (``idx``, ``instance``) become lists, lists are chained, dicts and tuples are
  collated entry by entry, ``None`` stays ``None``; ``loss`` is ``None`` (no criterion).

Returned tensors never alias the caller's inputs.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch

from .identity import ImageView

__all__ = ["collate", "same_image_sizes", "scene_result"]

try:
    import numpy as _np
except ImportError:  # numpy is optional for torch; without it no view can hold an array
    _np = None


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return torch.from_numpy(value)


def collate(values: Sequence[Any], as_lists: bool) -> Any:
    """Collate one entry over the pairs (``values[i]`` is pair ``i``'s value); see the module docstring."""
    first = values[0]
    if first is None:
        return None
    if isinstance(first, dict):
        return {name: collate([v[name] for v in values], as_lists) for name in first}
    if isinstance(first, tuple):
        return tuple(collate(list(column), as_lists) for column in zip(*values))
    if isinstance(first, (bool, int, float, str)):
        return list(values)
    if isinstance(first, torch.Tensor) or (_np is not None and isinstance(first, _np.ndarray)):
        tensors = [_as_tensor(v) for v in values]
        if as_lists:
            return [row.clone() for t in tensors for row in t.unbind(0)]
        return torch.cat(tensors)
    if isinstance(first, list):
        return [x for v in values for x in v]
    return list(values)


def same_image_sizes(views: Sequence[Tuple[ImageView, ImageView]]) -> bool:
    """dust3r's rule for concatenating: all first images share ``(H, W)``, and all second images do."""
    first = {v1.img.shape[-2:] for v1, _ in views}
    second = {v2.img.shape[-2:] for _, v2 in views}
    return len(first) == 1 and len(second) == 1


def scene_result(pairs: Sequence[Tuple[dict, dict]], predictions: Sequence[Tuple[Dict[str, torch.Tensor],
                 Dict[str, torch.Tensor]]], as_lists: bool) -> Dict[str, Any]:
    """dust3r's returned dict from the input pairs and the per-pair ``(pred1, pred2)`` (rows first, CPU)."""
    if len(predictions) != len(pairs):
        raise RuntimeError(f"{len(predictions)} predictions for {len(pairs)} pairs")
    columns: List[List[Any]] = [[p[0] for p in pairs], [p[1] for p in pairs], [p[0] for p in predictions],
                                [p[1] for p in predictions]]
    view1, view2, pred1, pred2 = (collate(column, as_lists) for column in columns)
    return dict(view1=view1, view2=view2, pred1=pred1, pred2=pred2, loss=None)

"""Synthetic DUSt3R scenes, their pair graph and an upstream-style inference loop (the baselines).

Shared by ``bench/test_bench_pairs.py``, ``examples/scene_inference.py`` and their tests:

* :func:`synthetic_scene` / :func:`scene_images`: images as dust3r's ``load_images`` returns them,
  ``dict(img=(1, 3, H, W) in [-1, 1], true_shape=np.int32 [[H, W]], idx=i, instance=str(i))``;
* :func:`complete_symmetrized_pairs`: ``make_pairs(scene_graph="complete", symmetrize=True)``'s list;
* :func:`upstream_style_inference`: dust3r's ``inference`` loop, written from its documented behaviour
  (batches of consecutive pairs, one ``model(view1, view2)`` per batch), the baseline the pair
  engine (:func:`fastpatch.inference`) is compared against;
* :func:`prediction_tensors`: the predicted maps of a result, in a fixed order, for error figures.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

__all__ = ["scene_images", "synthetic_scene", "complete_symmetrized_pairs", "collate", "upstream_style_inference",
           "prediction_tensors", "PREDICTION_KEYS"]

ImageDict = Dict[str, Any]
Pair = Tuple[ImageDict, ImageDict]
PREDICTION_KEYS = (("pred1", "pts3d"), ("pred1", "conf"), ("pred2", "pts3d_in_other_view"), ("pred2", "conf"))


def scene_images(sizes: Sequence[Tuple[int, int]], seed: int = 0) -> List[ImageDict]:
    """One random image per (height, width) in ``sizes``, as dust3r's ``load_images`` gives them.

    Image i: ``img`` float32 (1, 3, H, W) in [-1, 1], ``true_shape`` ``np.int32([[H, W]])``,
    ``idx`` i, ``instance`` ``str(i)``. A portrait size gives a portrait tensor (H > W), as
    ``load_images`` does at 512.
    """
    generator = torch.Generator().manual_seed(seed)
    return [dict(img=torch.rand(1, 3, h, w, generator=generator) * 2 - 1, true_shape=np.int32([[h, w]]), idx=i,
                 instance=str(i)) for i, (h, w) in enumerate(sizes)]


def synthetic_scene(n_images: int, height: int, width: int, seed: int = 0) -> List[ImageDict]:
    """``n_images`` random images of one size (see :func:`scene_images`)."""
    return scene_images([(height, width)] * n_images, seed)


def complete_symmetrized_pairs(images: Sequence[ImageDict]) -> List[Pair]:
    """Every ordered pair of distinct images, in dust3r's ``make_pairs("complete", symmetrize=True)`` order.

    First the pairs (images[i], images[j]) for i = 1..N-1 and j = 0..i-1 (i outer), then each of
    those reversed, in the same order: N (N - 1) pairs. The dicts are shared, not copied.
    """
    forward = [(images[i], images[j]) for i in range(len(images)) for j in range(i)]
    return forward + [(second, first) for first, second in forward]


def collate(items: Sequence[Any], lists: bool = False) -> Any:
    """Merge a list of like-structured items into one, as dust3r's ``collate_with_cat`` does.

    Dicts merge key by key, tuples position by position (a list of pair tuples gives a list of
    the views); tensors (numpy arrays are converted) are concatenated along dim 0, or with
    ``lists=True`` split into a list of their rows; lists are chained; ``None`` stays ``None``;
    other values (ints, strings) are gathered into a list.
    """
    first = items[0]
    if isinstance(first, dict):
        return {key: collate([item[key] for item in items], lists) for key in first}
    if isinstance(first, tuple):
        return [collate(list(parts), lists) for parts in zip(*items)]
    if first is None:
        return None
    if isinstance(first, np.ndarray):
        items = [torch.from_numpy(item) for item in items]
        first = items[0]
    if isinstance(first, torch.Tensor):
        return [row for item in items for row in item] if lists else torch.cat(list(items))
    if isinstance(first, list):
        return [value for item in items for value in item]
    return list(items)


def _to(value: Any, device, skip: Tuple[str, ...] = ()) -> Any:
    """``value`` with every tensor (numpy arrays converted) moved to ``device``; dict keys in ``skip`` untouched."""
    if isinstance(value, dict):
        return {key: item if key in skip else _to(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(item, device) for item in value)
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _same_sizes(pairs: Sequence[Pair]) -> bool:
    """Whether every first view has one image size and every second view has one image size."""
    first = {tuple(view1["img"].shape[-2:]) for view1, _ in pairs}
    second = {tuple(view2["img"].shape[-2:]) for _, view2 in pairs}
    return len(first) == 1 and len(second) == 1


@torch.no_grad()
def upstream_style_inference(pairs: Sequence[Pair], model: torch.nn.Module, device, batch_size: int = 8) -> dict:
    """dust3r's ``inference(pairs, model, device, batch_size)`` loop, without the progress bar.

    Consecutive pairs are taken ``batch_size`` at a time (``batch_size`` is forced to 1 when the
    first views, or the second views, do not all have one image size), collated with
    :func:`collate`, their tensors except ``true_shape`` moved to ``device``, and run as one
    ``model(view1, view2)``; each batch's views and predictions are moved to the CPU and all
    batches collated again (``lists=True`` for mixed sizes: per-pair lists instead of tensors).
    The caller's autocast and grad settings apply (dust3r's ``loss_of_one_batch`` switches CUDA
    autocast off; the benchmarks' bf16 rows run this loop under ``torch.autocast``).

    Returns:
        ``dict(view1, view2, pred1, pred2, loss=None)`` on the CPU, pairs in the input order.
    """
    mixed = not _same_sizes(pairs)
    step = 1 if mixed else batch_size
    results = []
    for start in range(0, len(pairs), step):
        view1, view2 = (_to(view, device, skip=("true_shape",)) for view in collate(list(pairs[start:start + step])))
        pred1, pred2 = model(view1, view2)
        results.append(_to(dict(view1=view1, view2=view2, pred1=pred1, pred2=pred2, loss=None), "cpu"))
    return collate(results, lists=mixed)


def prediction_tensors(result: dict) -> Tuple[torch.Tensor, ...]:
    """The maps of an inference result in :data:`PREDICTION_KEYS` order (each list item separately for mixed sizes)."""
    tensors = []
    for view, key in PREDICTION_KEYS:
        value = result[view][key]
        tensors.extend(value if isinstance(value, list) else [value])
    return tuple(tensors)

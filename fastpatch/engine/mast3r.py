"""``fastpatch.symmetric_inference``: mast3r's ``symmetric_inference(model, img1, img2, device)``
with encoder features reused across calls.

Contract (mast3r's ``mast3r.cloud_opt.sparse_ga``): ``img1`` / ``img2`` are dust3r image dicts
(``img`` ``(B, 3, H, W)``, ``true_shape`` ``(B, 2)``). Both images are encoded; the decoder runs both
ways, and the heads of both decoders give ``(res11, res21, res22, res12)``:

* ``res11``: head 1 on image 1 decoded against image 2; ``res21``: head 2 on image 2 against image 1;
* ``res22``: head 1 on image 2 against image 1; ``res12``: head 2 on image 1 against image 2;

each a dict of ``(B, H, W, ...)`` tensors on ``device`` (``pts3d``, ``conf``, ``desc``,
``desc_conf``; head 2's points keep the name ``pts3d``).

What is faster here: encoder features of images seen before come from a bounded cache shared by all
calls (same identity rule as :func:`fastpatch.inference`: tensor object, version and true shape,
plus the model object and its parameters' storage and versions), so a scene of N images is
encoded N times instead of once per pair. When both images have the same token shape, the two
decoder directions run as one batch of ``2B``. The cache keeps at most 1 GiB on the device (then
spills to the CPU) and 4 GiB on the CPU (then drops the least recently used); entries go as soon as
their image tensor or model is garbage-collected; :func:`clear_feature_cache` empties it. With
gradients enabled nothing is cached, nor are inference-mode images (they have no version counter).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from . import model_calls
from .feature_cache import FeatureCache
from .identity import ImageView, image_view, version_of

__all__ = ["symmetric_inference", "feature_cache", "clear_feature_cache"]

_CACHE = FeatureCache(device_budget=2**30, host_budget=4 * 2**30)

Head = Dict[str, torch.Tensor]


def feature_cache() -> FeatureCache:
    """The cache shared by :func:`symmetric_inference` calls (budgets and ``stats`` are readable and settable)."""
    return _CACHE


def clear_feature_cache() -> None:
    """Empty the shared cache (e.g. after mast3r's forward pass, before its global optimisation)."""
    _CACHE.clear()


def _model_state(model) -> tuple:
    """Identity of the model and of its weights as they are now (object, storage, version, mode)."""
    return (id(model), model.training if hasattr(model, "training") else None,
            tuple((p.data_ptr(), version_of(p)) for p in model.parameters()) if hasattr(model, "parameters") else ())


def _features(model, views: List[ImageView], device: torch.device) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Tokens and positions of each view, from the cache where possible; the rest encoded (together
    when they share a shape) and cached, unless gradients are on or the image is an inference-mode
    tensor (no version counter: an in-place write could not be seen)."""
    use_cache = not torch.is_grad_enabled()
    state = _model_state(model) if use_cache else None
    keys = [(state, str(device), view.key) for view in views]
    cacheable = {key: use_cache and version_of(view.img) is not None for key, view in zip(keys, views)}
    found = {key: _CACHE.get(key) for key in keys if cacheable[key]}
    todo: Dict[tuple, ImageView] = {}
    for key, view in zip(keys, views):
        if found.get(key) is None:
            todo.setdefault(key, view)
    if todo:
        missing = list(todo.items())
        same = len({(tuple(v.img.shape), v.img.dtype) for _, v in missing}) == 1
        batches = [missing] if same else [[item] for item in missing]
        for batch in batches:
            img = torch.cat([v.img.to(device, non_blocking=True) for _, v in batch])
            feat, pos = model_calls.encode(model, img, torch.cat([v.true_shape for _, v in batch]))
            start = 0
            for key, view in batch:
                found[key] = feat[start:start + view.rows], pos[start:start + view.rows]
                if cacheable[key]:
                    _CACHE.put(key, *found[key], owners=(view.img, model))
                start += view.rows
    return [found[key] for key in keys]


def _heads_of_both(model, head_num: int, decout, shape_a: torch.Tensor, shape_b: torch.Tensor,
                   rows: int) -> Tuple[Head, Head]:
    """Head ``head_num`` on a ``2B``-row decoder output: rows ``[:B]`` have ``shape_a``, ``[B:]`` ``shape_b``."""
    if torch.equal(shape_a, shape_b):
        both = model_calls.run_head(model, head_num, decout, torch.cat([shape_a, shape_b]))
        return {k: v[:rows] for k, v in both.items()}, {k: v[rows:] for k, v in both.items()}
    return (model_calls.run_head(model, head_num, decout, shape_a, slice(0, rows)),
            model_calls.run_head(model, head_num, decout, shape_b, slice(rows, 2 * rows)))


def symmetric_inference(model, img1: dict, img2: dict, device) -> Tuple[Head, Head, Head, Head]:
    """mast3r's symmetric pair inference, reusing cached encoder features (see module docstring).

    Args:
        model: an ``AsymmetricMASt3R`` (or DUSt3R) model on ``device``, with ``_encode_image``,
            ``_decoder`` and ``_downstream_head``.
        img1, img2: dust3r image dicts: ``img`` ``(B, 3, H, W)``, ``true_shape`` ``(B, 2)`` (numpy or tensor).
        device: where the images are sent.

    Returns:
        ``(res11, res21, res22, res12)``, dicts of head outputs on ``device``.

    Raises:
        TypeError: the model lacks the methods above, or an image dict is malformed.
        ValueError: the two images have different batch sizes, or a malformed ``true_shape``.
    """
    if not model_calls.has_engine_methods(model):
        raise TypeError(f"symmetric_inference needs a model with {', '.join(model_calls.ENGINE_METHODS)}; "
                        f"{type(model).__name__} lacks some")
    view1, view2 = image_view(img1, "img1"), image_view(img2, "img2")
    if view1.rows != view2.rows:
        raise ValueError(f"img1 has {view1.rows} rows and img2 {view2.rows}; a pair needs equal batch sizes")
    device = torch.device(device)
    (f1, p1), (f2, p2) = _features(model, [view1, view2], device)
    s1, s2, rows = view1.true_shape, view2.true_shape, view1.rows
    if f1.shape == f2.shape and p1.shape == p2.shape and f1.dtype == f2.dtype:
        dec_a, dec_b = model_calls.decode(model, torch.cat([f1, f2]), torch.cat([p1, p2]), torch.cat([f2, f1]),
                                          torch.cat([p2, p1]))
        res11, res22 = _heads_of_both(model, 1, dec_a, s1, s2, rows)
        res21, res12 = _heads_of_both(model, 2, dec_b, s2, s1, rows)
        return res11, res21, res22, res12
    dec1, dec2 = model_calls.decode(model, f1, p1, f2, p2)
    res11, res21 = model_calls.run_head(model, 1, dec1, s1), model_calls.run_head(model, 2, dec2, s2)
    dec2, dec1 = model_calls.decode(model, f2, p2, f1, p1)
    res22, res12 = model_calls.run_head(model, 1, dec2, s2), model_calls.run_head(model, 2, dec1, s1)
    return res11, res21, res22, res12

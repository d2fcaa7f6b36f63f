"""Single-process pair inference: encode each distinct image once, then decode the pairs in batches.

Phases (both under the caller's ``torch.no_grad``):

1. **Encode.** The distinct images of the pairs (by :mod:`.identity`) are encoded in batches of
   same-shape images (``2 * batch_size`` rows, as many as one of dust3r's pair batches encodes) with
   ``model._encode_image``; each image's tokens and positions go into a :class:`.FeatureCache`,
   which keeps the device within its budget by spilling to the CPU.
2. **Decode.** Pairs are batched by their decoder inputs' shapes (:mod:`.grouping`): features are
   gathered from the cache, ``model._decoder`` runs once per batch, each head once per distinct true
   shape of its side, and the outputs go to the CPU, one row block per pair.

A model without ``_encode_image`` / ``_decoder`` / ``_downstream_head`` is run as dust3r runs it,
``model(view1, view2)``, on batches of pairs with equal image and true shapes.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Sequence, Tuple

import torch

from . import model_calls
from .feature_cache import FeatureCache
from .grouping import encoder_batches, group_in_order, pair_batches
from .identity import ImageView
from .progress import Progress
from .results import collate

__all__ = ["Prediction", "predict_pairs", "distinct_images"]

#: One pair's ``(pred1, pred2)``: dicts of CPU tensors, one row per image row of the pair.
Prediction = Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]


def distinct_images(views: Sequence[Tuple[ImageView, ImageView]]) -> List[ImageView]:
    """The distinct images of ``views`` (by key), in order of first appearance."""
    seen: Dict[tuple, ImageView] = {}
    for pair in views:
        for view in pair:
            seen.setdefault(view.key, view)
    return list(seen.values())


def _split_rows(result: Dict[str, torch.Tensor], rows: int) -> List[Dict[str, torch.Tensor]]:
    """A batch's CPU outputs cut into blocks of ``rows`` rows (one block per pair)."""
    cut = {name: value.split(rows) for name, value in model_calls.move_rows(result).items()}
    count = len(next(iter(cut.values()))) if cut else 0
    return [{name: blocks[i] for name, blocks in cut.items()} for i in range(count)]


def _encode_all(model, images: Sequence[ImageView], device: torch.device, batch_size: int,
                cache: FeatureCache, verbose: bool) -> None:
    batches = encoder_batches(images, lambda v: (tuple(v.img.shape), v.img.dtype), lambda v: v.rows, 2 * batch_size)
    with Progress(len(images), "encode images", verbose) as progress:
        for batch in batches:
            img = torch.cat([v.img.to(device, non_blocking=True) for v in batch]) if len(batch) > 1 \
                else batch[0].img.to(device, non_blocking=True)
            feat, pos = model_calls.encode(model, img, torch.cat([v.true_shape for v in batch]))
            start = 0
            for view in batch:
                cache.put(view.key, feat[start:start + view.rows], pos[start:start + view.rows])
                start += view.rows
            progress.update(len(batch))


def _gather(cache: FeatureCache, keys: Sequence[tuple]) -> Tuple[torch.Tensor, torch.Tensor]:
    feats, poss = zip(*(cache.get(key) for key in keys))
    if len(keys) == 1:
        return feats[0], poss[0]
    return torch.cat(feats), torch.cat(poss)


def _heads(model, head_num: int, decout, sides: Sequence[ImageView], rows: int) -> List[Dict[str, torch.Tensor]]:
    """Head ``head_num`` for every pair of a decoder batch: one call per distinct true shape."""
    out: List[Dict[str, torch.Tensor]] = [{} for _ in sides]
    groups = group_in_order(range(len(sides)), lambda i: sides[i].true_shape_rows)
    for positions in groups:
        if len(groups) == 1:
            selected = None
        else:
            index = [p * rows + r for p in positions for r in range(rows)]
            selected = torch.tensor(index, device=decout[-1].device)
        shapes = torch.cat([sides[p].true_shape for p in positions])
        result = model_calls.run_head(model, head_num, decout, shapes, selected)
        if head_num == 2:
            model_calls.as_second_view(result)
        for position, block in zip(positions, _split_rows(result, rows)):
            out[position] = block
    return out


def _decode_all(model, views: Sequence[Tuple[ImageView, ImageView]], batch_size: int, cache: FeatureCache,
                verbose: bool) -> List[Prediction]:
    def signature(i: int):
        return cache.signature(views[i][0].key), cache.signature(views[i][1].key)

    predictions: List[Prediction] = [None] * len(views)  # type: ignore[list-item]
    batches = pair_batches(range(len(views)), signature, lambda i: views[i][0].rows, batch_size)
    with Progress(len(views), "decode pairs", verbose) as progress:
        for batch in batches:
            rows = views[batch[0]][0].rows
            f1, pos1 = _gather(cache, [views[i][0].key for i in batch])
            f2, pos2 = _gather(cache, [views[i][1].key for i in batch])
            dec1, dec2 = model_calls.decode(model, f1, pos1, f2, pos2)
            del f1, f2, pos1, pos2
            pred1 = _heads(model, 1, dec1, [views[i][0] for i in batch], rows)
            pred2 = _heads(model, 2, dec2, [views[i][1] for i in batch], rows)
            for i, p1, p2 in zip(batch, pred1, pred2):
                predictions[i] = (p1, p2)
            progress.update(len(batch))
    return predictions


def _forward_all(model, pairs: Sequence[Tuple[dict, dict]], views: Sequence[Tuple[ImageView, ImageView]],
                 device: torch.device, batch_size: int, verbose: bool) -> List[Prediction]:
    """Fallback: ``model(view1, view2)`` on batches of pairs with equal image and true shapes."""
    warnings.warn(f"{type(model).__name__} has no {', '.join(model_calls.ENGINE_METHODS)}: fastpatch.inference runs "
                  "model(view1, view2) per batch of same-shape pairs, encoding each image once per pair as dust3r "
                  "does", RuntimeWarning, stacklevel=5)  # the caller of fastpatch.inference (under no_grad)
    def signature(i: int):
        return tuple((tuple(v.img.shape), v.img.dtype, v.true_shape_rows) for v in views[i])

    predictions: List[Prediction] = [None] * len(views)  # type: ignore[list-item]
    batches = pair_batches(range(len(views)), signature, lambda i: views[i][0].rows, batch_size)
    with Progress(len(views), "pairs (model forward)", verbose) as progress:
        for batch in batches:
            rows = views[batch[0]][0].rows
            batch_views = []
            for side in (0, 1):
                view = collate([pairs[i][side] for i in batch], as_lists=False)
                view["img"] = view["img"].to(device, non_blocking=True)
                batch_views.append(view)
            pred1, pred2 = model(*batch_views)
            for i, p1, p2 in zip(batch, _split_rows(pred1, rows), _split_rows(pred2, rows)):
                predictions[i] = (p1, p2)
            progress.update(len(batch))
    return predictions


def predict_pairs(model, pairs: Sequence[Tuple[dict, dict]], views: Sequence[Tuple[ImageView, ImageView]],
                  device: torch.device, batch_size: int, cache: FeatureCache, verbose: bool) -> List[Prediction]:
    """``(pred1, pred2)`` for every pair, in order, on the CPU.

    ``pairs``: the dust3r image dicts; ``views``: their :class:`ImageView` (same order); ``cache``:
    where encoder features live during the call (unused by the ``model(view1, view2)`` fallback).
    """
    if not views:
        return []
    if not model_calls.has_engine_methods(model):
        return _forward_all(model, pairs, views, device, batch_size, verbose)
    _encode_all(model, [v for v in distinct_images(views) if v.key not in cache], device, batch_size, cache, verbose)
    return _decode_all(model, views, batch_size, cache, verbose)

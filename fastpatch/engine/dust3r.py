"""``fastpatch.inference``: dust3r's ``inference(pairs, model, device, batch_size=8, verbose=True)``,
with each distinct image encoded once and the pairs decoded in shape batches.

Drop-in: same arguments, same returned dict (:mod:`.results`), same pair order, results on the CPU.
The work is done by the model's own ``_encode_image``, ``_decoder`` and ``_downstream_head``
(:mod:`.model_calls`), so DUSt3R and MASt3R models, patched by fastpatch or not, give their own
outputs; a model without those methods runs as ``model(view1, view2)``. Under an initialised
``torch.distributed`` the pairs are sharded over the ranks (:mod:`.distributed`).
"""
from __future__ import annotations

import numbers
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from . import distributed as dist_engine
from .feature_cache import FeatureCache, default_device_budget
from .identity import ImageView, image_view
from .model_calls import has_engine_methods
from .results import same_image_sizes, scene_result
from .runner import distinct_images, predict_pairs

__all__ = ["inference"]


def _views(pairs: Any) -> Sequence[Tuple[ImageView, ImageView]]:
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"pairs must be a list of (view1, view2) image-dict pairs, got {type(pairs).__name__}")
    if len(pairs) == 0:
        raise ValueError("pairs is empty: nothing to infer")
    views = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, Sequence) or isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise TypeError(f"pairs[{i}] must be a (view1, view2) pair of image dicts, got {type(pair).__name__}")
        v1, v2 = image_view(pair[0], f"pairs[{i}][0]"), image_view(pair[1], f"pairs[{i}][1]")
        if v1.rows != v2.rows:
            raise ValueError(f"pairs[{i}]: the two images have {v1.rows} and {v2.rows} rows; "
                             "a pair needs equal batch sizes")
        views.append((v1, v2))
    return views


def _device_budget(device: torch.device, feature_budget_mb: Optional[float]) -> Optional[int]:
    if feature_budget_mb is None:
        return default_device_budget(device)
    if isinstance(feature_budget_mb, bool) or not isinstance(feature_budget_mb, numbers.Real) or feature_budget_mb < 0:
        raise ValueError(f"feature_budget_mb must be a non-negative number of MiB or None, got {feature_budget_mb!r}")
    return int(feature_budget_mb * 2**20)


@torch.no_grad()
def inference(pairs, model, device, batch_size: int = 8, verbose: bool = True, *,
              feature_budget_mb: Optional[float] = None, distributed: Optional[bool] = None) -> Dict[str, Any]:
    """Run ``model`` on image pairs, encoding each distinct image once (drop-in for dust3r's ``inference``).

    Args:
        pairs: list of ``(view1, view2)`` dust3r image dicts (``make_pairs`` output): ``img``
            ``(B, 3, H, W)`` float (B is 1 from ``load_images``), ``true_shape`` ``(B, 2)`` int
            (numpy or tensor), and any other entries (``idx``, ``instance``), which are carried over.
            Images are identified by tensor identity and version, never by ``instance``.
        model: a DUSt3R / MASt3R model (``AsymmetricCroCo3DStereo``, ``AsymmetricMASt3R``, patched or
            not), already on ``device``; any ``model(view1, view2) -> (pred1, pred2)`` works through
            the fallback.
        device: where the images are sent (``"cuda"``, ``"cpu"``, a ``torch.device``).
        batch_size: pairs per decoder batch (images are encoded ``2 * batch_size`` at a time).
        verbose: progress (tqdm if installed, else a plain line) and a final pairs/s line.
        feature_budget_mb: device memory for encoder features in MiB, beyond which they are spilled
            to the CPU (default: ``FASTPATCH_FEATURE_BUDGET_MB``, else a quarter of a CUDA device,
            unbounded on the CPU).
        distributed: ``None`` shards the pairs over ranks when ``torch.distributed`` is initialised
            (every rank must pass the same pairs), ``False`` never, ``True`` requires it.

    Returns:
        ``dict(view1, view2, pred1, pred2, loss=None)`` on the CPU, in pair order: tensors are
        concatenated over pairs when all first images share a size and all second images share a
        size, else lists of per-pair tensors (as dust3r). ``pred1``: ``pts3d`` ``(P, H, W, 3)``,
        ``conf`` ``(P, H, W)`` (+ ``desc``, ``desc_conf`` for MASt3R); ``pred2``: the same with
        ``pts3d_in_other_view``.

    Raises:
        TypeError / ValueError: malformed pairs (naming the pair and entry), ``batch_size`` < 1.
        RuntimeError: ranks disagree on the pairs, or ``distributed=True`` without a process group.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    views = _views(pairs)
    device = torch.device(device)
    budget = _device_budget(device, feature_budget_mb)
    start = time.perf_counter()

    world = dist_engine.active_world(distributed)
    rank, world_size = world if world is not None else (0, 1)
    talk = bool(verbose) and rank == 0
    if world is not None:
        dist_engine.check_same_pairs(dist_engine.pairs_signature(views))
    mine = dist_engine.shard(len(views), rank, world_size)
    if talk:
        where = f" on {world_size} ranks" if world is not None else ""
        print(f">> fastpatch.inference: {len(views)} image pairs, {len(distinct_images(views))} distinct images{where}")

    cache = FeatureCache(device_budget=budget)
    local = predict_pairs(model, [pairs[i] for i in mine], [views[i] for i in mine], device, batch_size, cache, talk)
    stats = cache.stats
    cache.clear()  # the features' memory is free before the gather and the collation
    predictions = dist_engine.gather_in_order(local) if world is not None else local
    result = scene_result(pairs, predictions, as_lists=not same_image_sizes(views))

    if talk:
        elapsed = time.perf_counter() - start
        if has_engine_methods(model):
            spill = f", {stats.spilled} spilled to the CPU" if stats.spilled else ""
            who = "rank 0 encoded" if world is not None else "encoded"
            how = f"{who} {stats.stored} images once each{spill}"
        else:
            how = "model(view1, view2) per pair batch"
        print(f">> {len(views)} pairs in {elapsed:.2f} s: {len(views) / elapsed:.2f} pairs/s ({how})")
    return result

"""The pair engine: dust3r's ``inference`` and mast3r's ``symmetric_inference``, with each distinct
image encoded once, pairs decoded in shape batches, bounded device memory and ``torch.distributed``
scale-out.

Files, one concern each: :mod:`.identity` (when two views are the same image), :mod:`.feature_cache`
(encoder features, device budget, spill to the CPU), :mod:`.grouping` (batching by shape),
:mod:`.model_calls` (the model methods the engine calls), :mod:`.runner` (single-process encode and
decode), :mod:`.distributed` (sharding and gathering), :mod:`.results` (dust3r's returned dict),
:mod:`.progress` (tqdm or a plain line), :mod:`.dust3r` and :mod:`.mast3r` (the two drop-ins).
"""
from .dust3r import inference
from .mast3r import clear_feature_cache, symmetric_inference

__all__ = ["inference", "symmetric_inference", "clear_feature_cache"]

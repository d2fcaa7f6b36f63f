"""VGGT's real aggregator, unpatched vs patched, side by side.

``vggt.models.aggregator.Aggregator`` from a checkout named by ``FASTPATCH_VGGT_DIR`` (facebookresearch/vggt's
``vggt/`` package; VGGT's code is never vendored here), at VGGT's width (C 1024, 16 heads), with random
weights and the convolutional patch embedding (the DINOv2 encoder is left alone by fastpatch, so it
would only add the same time to both sides), on 518x392 frames (1041 tokens each) under
``torch.inference_mode``. CPU: float32, 2 frames, depth 2 (two frame and two global blocks); CUDA: bf16
autocast (VGGT's demo), 8 frames, depth 24. Rows: ``eager`` (the upstream module) and ``fastpatch``
(:func:`fastpatch.patch_model` of a copy sharing every parameter), measured interleaved
(:func:`bench.cases.measure`); the ``fastpatch`` row records ``patch_summary`` (the report's line).

Skipped without ``FASTPATCH_VGGT_DIR``. ``FASTPATCH_BENCH_ROUNDS`` overrides the rounds (5 CPU, 10 CUDA).
"""
from __future__ import annotations

import copy
import functools
import importlib
import os
import sys
from typing import Dict, Tuple

import pytest
import torch

import fastpatch

from .cases import DEVICE, EAGER, FASTPATCH, Case, Side, make_step, measure

VGGT_DIR = os.environ.get("FASTPATCH_VGGT_DIR", "")
if not (VGGT_DIR and os.path.isfile(os.path.join(VGGT_DIR, "vggt", "models", "aggregator.py"))):
    pytest.skip("FASTPATCH_VGGT_DIR is not set (a checkout holding facebookresearch/vggt's vggt/ package)",
                allow_module_level=True)

HEIGHT, WIDTH = 392, 518
FRAMES, DEPTH = (8, 24) if DEVICE == "cuda" else (2, 2)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CASE = Case("vggt_aggregator", "forward", f"s{FRAMES}-d{DEPTH}", 1, DTYPE, DEVICE)
ROUNDS = int(os.environ.get("FASTPATCH_BENCH_ROUNDS", "10" if DEVICE == "cuda" else "5"))


@functools.lru_cache(maxsize=1)
def models() -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(upstream aggregator, patched copy sharing its parameters and buffers)."""
    if VGGT_DIR not in sys.path:
        sys.path.insert(0, VGGT_DIR)
    aggregator_class = importlib.import_module("vggt.models.aggregator").Aggregator
    torch.manual_seed(0)
    upstream = aggregator_class(img_size=518, patch_size=14, embed_dim=1024, depth=DEPTH, num_heads=16,
                                patch_embed="conv").eval().to(DEVICE)
    shared = {id(t): t for t in (*upstream.parameters(), *upstream.buffers())}
    return upstream, fastpatch.patch_model(copy.deepcopy(upstream, memo=shared))


def build_sides() -> Dict[str, Side]:
    upstream, patched = models()
    images = torch.rand(1, FRAMES, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    autocast = None if DTYPE == torch.float32 else DTYPE

    def outputs(model):
        return lambda imgs: model(imgs)[0]  # the list of per-block outputs

    return {name: Side(make_step(outputs(model), (images,), "forward", DEVICE, autocast=autocast))
            for name, model in ((EAGER, upstream), (FASTPATCH, patched))}


@pytest.mark.parametrize("provider", [EAGER, FASTPATCH])
def test_bench_vggt_upstream(benchmark, provider):
    benchmark.group = CASE.name
    measure(benchmark, CASE, provider, build_sides(), None, rounds=ROUNDS)
    if provider == FASTPATCH and not benchmark.disabled:
        benchmark.extra_info["patch_summary"] = models()[1].fastpatch_report.summary()

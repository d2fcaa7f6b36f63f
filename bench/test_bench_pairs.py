"""Scene inference, pairs/s: dust3r's upstream inference loop vs the pair engine (``fastpatch.inference``).

A synthetic scene of N images (:mod:`bench.pairs`), its complete symmetrised pair graph (N (N - 1)
pairs, ``make_pairs`` order) and the ViT-L/Base linear-head DUSt3R model
(:mod:`fastpatch.reference_model`, random weights). Three providers on one model object:

* ``eager``: the unpatched model in the upstream-style loop (:func:`bench.pairs.upstream_style_inference`);
* ``upstream_loop``: the same model patched with fastpatch modules, same loop, same batches
  (``eager`` runs before each round: ratio and error vs eager);
* ``fastpatch``: ``fastpatch.inference`` on the patched model (``upstream_loop`` runs before each
  round: the ratio and error isolate the engine, fastpatch modules on both sides).

Sizes: CPU (fp32) at 224x224 (``DUSt3R_ViTLarge_BaseDecoder_224_linear``), few rounds: by default 3
images / 6 pairs with ``batch_size=2``; the full matrix (``FASTPATCH_BENCH_FULL=1``) 4 images / 12 pairs
with ``batch_size=2`` and 8 images / 56 pairs with dust3r's default ``batch_size=8`` (an upstream loop
over 56 pairs is ~19 TFLOP, minutes on two cores). CUDA: 16 images / 240 pairs at 384x512
(``..._512_linear``), ``batch_size=8``, float32 (TF32 off) and bfloat16 autocast.
``extra_info`` adds ``images``, ``pairs``, ``encodes`` (image encodes the provider runs: 2 per pair
upstream, as no batch of this pair order is symmetrised; 1 per image for the engine) and
``pairs_per_s`` (pairs / median seconds); FLOPs count those encodes plus every pair's decoder and heads.
"""
import functools
import statistics
from dataclasses import dataclass

import pytest
import torch

import fastpatch
from fastpatch.reference_model import dust3r_model

from . import flops
from .cases import BACKENDS, DEVICE, EAGER, FASTPATCH, FULL, Case, Side, make_step, measure
from .pairs import complete_symmetrized_pairs, prediction_tensors, synthetic_scene, upstream_style_inference

UPSTREAM_LOOP = "upstream_loop"
PROVIDERS = [EAGER, UPSTREAM_LOOP, FASTPATCH]
PARTNERS = {EAGER: [], UPSTREAM_LOOP: [EAGER], FASTPATCH: [UPSTREAM_LOOP]}  # run before each round
BASELINE = {EAGER: EAGER, UPSTREAM_LOOP: EAGER, FASTPATCH: UPSTREAM_LOOP}  # errors are measured against
PATCH = 16


@dataclass(frozen=True)
class Scene:
    images: int
    height: int
    width: int
    batch_size: int
    dtype: torch.dtype
    loop_rounds: int  # rounds of the eager and upstream_loop rows (each upstream_loop round also runs eager)
    engine_rounds: int  # rounds of the fastpatch row (each also runs upstream_loop)
    warmup_rounds: int

    @property
    def pairs(self) -> int:
        return self.images * (self.images - 1)

    @property
    def config(self) -> str:
        return "DUSt3R_ViTLarge_BaseDecoder_224_linear" if max(self.height, self.width) <= 224 \
            else "DUSt3R_ViTLarge_BaseDecoder_512_linear"

    @property
    def case(self) -> Case:
        return Case(f"scene{self.images}", "forward", f"{self.height}x{self.width}", self.batch_size, self.dtype,
                    DEVICE)

    def encodes(self, provider: str) -> int:
        return self.images if provider == FASTPATCH else 2 * self.pairs

    def rounds(self, provider: str) -> int:
        return self.engine_rounds if provider == FASTPATCH else self.loop_rounds


if DEVICE == "cuda":
    SCENES = [Scene(16, 384, 512, 8, dtype, loop_rounds=3, engine_rounds=5, warmup_rounds=1)
              for dtype in (torch.float32, torch.bfloat16)]
elif FULL:
    SCENES = [Scene(4, 224, 224, 2, torch.float32, loop_rounds=1, engine_rounds=3, warmup_rounds=0),
              Scene(8, 224, 224, 8, torch.float32, loop_rounds=1, engine_rounds=1, warmup_rounds=0)]
else:  # the default: one small scene, so that the whole bench/ run stays within minutes on two cores
    SCENES = [Scene(3, 224, 224, 2, torch.float32, loop_rounds=1, engine_rounds=2, warmup_rounds=0)]


@functools.lru_cache(maxsize=1)
def model(config: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return dust3r_model(config).eval().to(DEVICE)


@functools.lru_cache(maxsize=1)
def scene_pairs(images: int, height: int, width: int):
    return complete_symmetrized_pairs(synthetic_scene(images, height, width, seed=1))


def build_sides(scene: Scene):
    """The three providers on one shared model, patched or unpatched before each call (untimed)."""
    net = model(scene.config)
    pairs = scene_pairs(scene.images, scene.height, scene.width)

    def upstream_loop():
        return prediction_tensors(upstream_style_inference(pairs, net, DEVICE, batch_size=scene.batch_size))

    def engine():
        return prediction_tensors(fastpatch.inference(pairs, net, DEVICE, batch_size=scene.batch_size, verbose=False))

    def unpatch():
        fastpatch.unpatch_model(net)

    def patch():
        fastpatch.patch_model(net)

    autocast = None if scene.dtype == torch.float32 else scene.dtype
    calls = {EAGER: (upstream_loop, None, unpatch), UPSTREAM_LOOP: (upstream_loop, BACKENDS[FASTPATCH], patch),
             FASTPATCH: (engine, BACKENDS[FASTPATCH], patch)}
    return {name: Side(make_step(call, (), "forward", DEVICE, backend, autocast=autocast), prepare=prepare)
            for name, (call, backend, prepare) in calls.items()}


CASE_PROVIDERS = [(scene, provider) for scene in SCENES for provider in PROVIDERS]


@pytest.mark.parametrize("scene,provider", CASE_PROVIDERS, ids=[f"{s.case.name}-{p}" for s, p in CASE_PROVIDERS])
def test_bench_pairs(benchmark, scene, provider):
    case = scene.case
    benchmark.group = case.name
    tokens = (scene.height // PATCH) * (scene.width // PATCH)
    measure(benchmark, case, provider, build_sides(scene), flops.scene(scene.encodes(provider), scene.pairs, tokens),
            rounds=scene.rounds(provider), warmup_rounds=scene.warmup_rounds, partners=PARTNERS[provider],
            baseline=BASELINE[provider])
    if benchmark.disabled:
        return
    median_s = statistics.median(benchmark.stats.stats.data)
    benchmark.extra_info.update(images=scene.images, pairs=scene.pairs, encodes=scene.encodes(provider),
                                pairs_per_s=round(scene.pairs / median_s, 4))
    print(f"{case.name} [{provider}]: {scene.pairs / median_s:.3f} pairs/s")

"""Whole DUSt3R backbone: the ViT-L encoder (``encode`` of one image) and the full pair forward
(encoder on both images + both decoder streams, no heads), ``DUSt3R_ViTLarge_BaseDecoder_512`` with
random weights, eager vs patched, under ``torch.inference_mode``. Images: 512x384 on CUDA and in the
full matrix (``FASTPATCH_BENCH_FULL=1``); 224x224 (196 tokens, the 224 models' size) in the CPU
default, so that ``pytest bench/ --benchmark-only`` finishes in minutes on two cores (512x384 took
~170 s for this file alone there).

One model object serves every provider: ``eager`` runs it after :func:`fastpatch.unpatch_model`,
``torch_path`` (CUDA) and ``fastpatch`` after :func:`fastpatch.patch_model` (same parameters; the
switch is untimed), and ``eager_compiled`` runs ``torch.compile`` of the eager model (compilation in
the warm-up). float32 on CPU, batch 1; bfloat16 autocast on CUDA, batch 1 and 8.

``FASTPATCH_BENCH_COMPILE``: unset = compile the encoder on CUDA only (the pair takes minutes to
compile); ``1`` = encoder and pair on any device; ``0`` = never. The CPU default is 3 rounds per
provider (ViT-L is ~0.5 TFLOP per 512x384 image, ~0.12 TFLOP per 224x224 image).
"""
import functools
import os

import pytest
import torch

import fastpatch
from fastpatch.reference import dust3r_backbone

from . import flops
from .cases import BACKENDS, DEVICE, EAGER, FULL, Case, Side, base_providers, make_step, measure

CONFIG = "DUSt3R_ViTLarge_BaseDecoder_512"
HEIGHT, WIDTH, PATCH = (384, 512, 16) if DEVICE == "cuda" or FULL else (224, 224, 16)
TOKENS = (HEIGHT // PATCH) * (WIDTH // PATCH)
COMPILED = "eager_compiled"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CASES = [Case(component, "forward", f"{HEIGHT}x{WIDTH}", batch, DTYPE, DEVICE)
         for component in ("encoder", "pair") for batch in ([1, 8] if DEVICE == "cuda" else [1])]
ROUNDS = 10 if DEVICE == "cuda" else 3
FLOPS = {"encoder": flops.encoder, "pair": flops.pair}


def compiles(component: str) -> bool:
    """Whether ``eager_compiled`` runs for ``component`` (see ``FASTPATCH_BENCH_COMPILE``)."""
    setting = os.environ.get("FASTPATCH_BENCH_COMPILE")
    if setting is None:
        return DEVICE == "cuda" and component == "encoder"
    return setting == "1"


@functools.lru_cache(maxsize=1)
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return dust3r_backbone(CONFIG).eval().to(DEVICE)


@functools.lru_cache(maxsize=2)
def images(batch: int):
    torch.manual_seed(1)
    return tuple(torch.randn(batch, 3, HEIGHT, WIDTH).clamp_(-1, 1).to(DEVICE) for _ in range(2))


def build_sides(case: Case):
    """Every provider's call on the one shared model, switched by patching / unpatching before each call."""
    net = model()
    img1, img2 = images(case.batch)
    inputs = (img1,) if case.component == "encoder" else (img1, img2)

    def call(m):
        return m.encode if case.component == "encoder" else m

    def unpatch():
        fastpatch.unpatch_model(net)

    def patch():
        fastpatch.patch_model(net)

    autocast = None if case.dtype == torch.float32 else case.dtype
    sides = {name: Side(make_step(call(net), inputs, case.mode, case.device, BACKENDS[name], autocast=autocast),
                        prepare=unpatch if name == EAGER else patch)
             for name in base_providers(case.device)}
    if compiles(case.component):
        sides[COMPILED] = Side(make_step(torch.compile(call(net)), inputs, case.mode, case.device, autocast=autocast),
                               prepare=unpatch)
    return sides


def providers(component: str):
    return base_providers() + ([COMPILED] if compiles(component) else [])


# Compiled providers last: a run cut short by a timeout (bench/gpu_run.sh) keeps every other row.
CASE_PROVIDERS = sorted(((case, provider) for case in CASES for provider in providers(case.component)),
                        key=lambda pair: pair[1] == COMPILED)


@pytest.mark.parametrize("case,provider", CASE_PROVIDERS, ids=[f"{c.name}-{p}" for c, p in CASE_PROVIDERS])
def test_bench_model(benchmark, case, provider):
    benchmark.group = case.name
    warmup = 1 if provider == COMPILED or case.component == "encoder" else 0
    measure(benchmark, case, provider, build_sides(case), FLOPS[case.component](case.batch, TOKENS),
            rounds=ROUNDS, warmup_rounds=warmup if DEVICE == "cpu" else 2)

"""Test-only access to the real upstream DUSt3R code (the ``mini-dust3r`` package).

Upstream code is CC BY-NC-SA: it is never vendored here, only imported when installed
(``pip install --no-deps mini-dust3r==0.1.2`` plus the few pure-Python/CPU packages its model and
inference modules import, done by ``scripts/setup_env.sh``). Its ``utils.image`` imports
``torchvision.transforms`` at import time for image loading, which no test uses; PyPI's torchvision
does not load beside the CPU torch wheel, so when torchvision is missing a stand-in module without
any transform is put in ``sys.modules`` just for that import.
Its import switches TF32 on globally and prints a warning about a missing CUDA RoPE extension;
:func:`load_upstream` restores every global flag it may touch right after the import (so fp32
kernels on CUDA inside the block run in IEEE fp32, as everywhere else) and again when the block exits.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import subprocess
import sys
import types
from dataclasses import dataclass
from types import ModuleType
from typing import Iterator

import pytest
import torch


@dataclass
class UpstreamCode:
    """The upstream modules tests build reference objects from."""

    blocks: ModuleType  # Attention, CrossAttention, Block, DecoderBlock, Mlp
    patch_embed: ModuleType  # PatchEmbedDust3R, ManyAR_PatchEmbed, get_patch_embed
    croco: ModuleType  # CroCoNet
    model: ModuleType  # AsymmetricCroCo3DStereo
    rope: ModuleType  # RoPE2D (pure-torch version)
    inference: ModuleType  # inference, loss_of_one_batch (dust3r.inference)
    image_pairs: ModuleType  # make_pairs (dust3r.image_pairs)


def _global_flags():
    return (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
        torch.get_default_dtype(),
    )


def _restore(flags) -> None:
    tf32_matmul, tf32_cudnn, precision, default_dtype = flags
    torch.backends.cuda.matmul.allow_tf32 = tf32_matmul
    torch.backends.cudnn.allow_tf32 = tf32_cudnn
    torch.set_float32_matmul_precision(precision)
    torch.set_default_dtype(default_dtype)


def _import_inference() -> ModuleType:
    _torchvision_stand_in()
    return importlib.import_module("mini_dust3r.inference")


def _torchvision_stand_in() -> None:
    """Let ``import torchvision.transforms as tvf`` succeed where torchvision cannot be installed.

    The stand-in's ``Compose``/``ToTensor``/``Normalize`` build transforms that raise when applied:
    only upstream's image loading applies them, and tests build their images as tensors.
    """
    try:
        import torchvision.transforms  # noqa: F401
        return
    except Exception:
        pass

    def apply(*args, **kwargs):
        raise RuntimeError("torchvision is not installed: tests must not load images through upstream's loader")

    def transform(*args, **kwargs):
        return apply

    transforms = types.ModuleType("torchvision.transforms")
    transforms.Compose = transforms.ToTensor = transforms.Normalize = transform
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = package, transforms


@contextlib.contextmanager
def load_upstream() -> Iterator[UpstreamCode]:
    """Import mini-dust3r (skipping the test if it is not installed) and restore global state on exit."""
    flags = _global_flags()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                code = UpstreamCode(
                    blocks=importlib.import_module("mini_dust3r.croco.blocks"),
                    patch_embed=importlib.import_module("mini_dust3r.patch_embed"),
                    croco=importlib.import_module("mini_dust3r.croco.croco"),
                    model=importlib.import_module("mini_dust3r.model"),
                    rope=importlib.import_module("mini_dust3r.croco.pos_embed"),
                    inference=_import_inference(),
                    image_pairs=importlib.import_module("mini_dust3r.image_pairs"),
                )
            except ImportError as exc:
                pytest.skip(f"upstream DUSt3R code (mini-dust3r==0.1.2) is not installed: {exc}")
        _restore(flags)
        yield code
    finally:
        _restore(flags)


def perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add Gaussian noise to every parameter in place.

    Upstream initialisation zeroes biases and sets LayerNorms to 1/0, which would hide a swapped
    or missing bias/affine term; noise makes every parameter matter.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype)
            p.add_(noise * scale)
    return module


def run_checkout_script(script: str, checkout: str, timeout: float = 600) -> dict:
    """Run ``script`` (Python source) in a fresh interpreter with ``checkout`` as its ``sys.argv[1]``, so
    a public checkout's packages and import-time settings stay out of the test session; returns the
    JSON object its last stdout line prints. Fails the test, with the stderr tail, if the script fails."""
    done = subprocess.run([sys.executable, "-c", script, checkout], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])

"""The real upstream DUSt3R encoder, unpatched vs patched vs ``torch.compile`` of each, side by side.

What ``AsymmetricCroCo3DStereo._encode_image(img, true_shape)`` runs -- ``PatchEmbedDust3R``, 24 ViT-L
blocks (RoPE100 attention), ``enc_norm`` -- on a 512x384 image at batch 1 and 2 (dust3r encodes both
views of a pair in one batch), with random weights in ``DUSt3R_ViTLarge_BaseDecoder_512``'s
configuration, under ``torch.inference_mode``; float32 on CPU, bfloat16 autocast on CUDA. Rows:

* ``eager``: upstream's modules, never patched;
* ``fastpatch``: a copy of the model sharing every parameter and buffer, after :func:`fastpatch.patch_model`;
* ``eager_compiled``: ``torch.compile`` of upstream's ``_encode_image`` (upstream's RoPE calls
  ``positions.max().item()``, so dynamo splits the graph there);
* ``fastpatch_compiled``: ``torch.compile(..., fullgraph=True)`` of the patched ``_encode_image``;
* ``matmul_floor``: not the encoder, its time floor: only the encoder's matrix products, at its shapes
  and with its weights, through the GEMM the patched model runs (:func:`fastpatch.ops.linear_onednn.linear`
  without post-ops) and torch's SDPA, with no norm, GELU, RoPE, residual or layout pass
  (:func:`matmul_floor`). Its ``vs_eager`` is the most any implementation built on these GEMM and
  SDPA kernels can gain over eager in that run; its ``vs_fastpatch`` (patched time / floor time,
  >= 1) how far the patched model is from it. It records no error (it computes another function).

Ratios are measured interleaved (:func:`bench.cases.measure`): before each round of a row, its
partners run once each, timed, and ``vs_<partner>`` is the median of the per-round ratios
(``fastpatch``: ``eager`` and ``eager_compiled``; ``fastpatch_compiled``: those and ``fastpatch``;
``eager_compiled``: ``eager``; ``matmul_floor``: ``eager`` and ``fastpatch``). Each row also records
``max_rel_error_vs_eager`` (``matmul_floor``: None); the ``fastpatch`` row adds
``max_rel_error_vs_float64`` for itself and for ``eager`` (a float64 copy of the upstream model as the
oracle), the ``fastpatch_compiled`` row the graph and graph-break counts of ``torch._dynamo.explain`` on
the patched encoder (the test fails on any break), every row the CPU model and its feature flags
(``lscpu``) and the 1-minute load average before and after it.

Runs only when ``FASTPATCH_DUST3R_DIR`` points at a naver/dust3r checkout with its croco submodule
(upstream code is never vendored here); otherwise the whole file is skipped with that reason.
``FASTPATCH_BENCH_ROUNDS`` overrides the rounds per row (default 5 on CPU, 10 on CUDA).
"""
from __future__ import annotations

import copy
import functools
import importlib
import os
import subprocess
import sys
import types
from typing import Dict, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

import fastpatch

from . import flops
from .cases import DEVICE, EAGER, FASTPATCH, Case, Side, make_step, measure
from fastpatch.ops.linear_onednn import linear
from fastpatch.testing import relative_error

DUST3R_DIR = os.environ.get("FASTPATCH_DUST3R_DIR", "")
_NEEDED = ("dust3r/model.py", "croco/models/blocks.py", "croco/models/pos_embed.py")


def _skip_reason() -> Optional[str]:
    if not DUST3R_DIR:
        return "FASTPATCH_DUST3R_DIR is not set (path of a naver/dust3r checkout with its croco submodule)"
    missing = [name for name in _NEEDED if not os.path.isfile(os.path.join(DUST3R_DIR, name))]
    if missing:
        return (f"FASTPATCH_DUST3R_DIR={DUST3R_DIR} lacks {', '.join(missing)} "
                "(a naver/dust3r checkout with its croco submodule: git submodule update --init)")
    return None


if _skip_reason() is not None:
    pytest.skip(_skip_reason(), allow_module_level=True)

HEIGHT, WIDTH, PATCH = 384, 512, 16
TOKENS = (HEIGHT // PATCH) * (WIDTH // PATCH)
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CASES = [Case("upstream_encoder", "forward", f"{HEIGHT}x{WIDTH}", batch, DTYPE, DEVICE) for batch in (1, 2)]
ROUNDS = int(os.environ.get("FASTPATCH_BENCH_ROUNDS", "10" if DEVICE == "cuda" else "5"))
EAGER_COMPILED, FASTPATCH_COMPILED, MATMUL_FLOOR = "eager_compiled", "fastpatch_compiled", "matmul_floor"
PROVIDERS = [EAGER, FASTPATCH, EAGER_COMPILED, FASTPATCH_COMPILED, MATMUL_FLOOR]
PARTNERS = {EAGER: [], FASTPATCH: [EAGER, EAGER_COMPILED], EAGER_COMPILED: [EAGER],
            FASTPATCH_COMPILED: [EAGER, EAGER_COMPILED, FASTPATCH], MATMUL_FLOOR: [EAGER, FASTPATCH]}
# DUSt3R_ViTLarge_BaseDecoder_512_dpt's encoder (the decoder and head are built but not run; a linear head
# needs no extra packages)
CONFIG = dict(output_mode="pts3d", head_type="linear", img_size=(512, 512), patch_embed_cls="PatchEmbedDust3R",
              enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, dec_embed_dim=768, dec_depth=12,
              dec_num_heads=12, pos_embed="RoPE100")


def _global_flags():
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


@functools.lru_cache(maxsize=1)
def _model_class() -> type:
    """dust3r's ``AsymmetricCroCo3DStereo``, imported from ``FASTPATCH_DUST3R_DIR`` with torch's TF32
    switches restored afterwards (croco's import turns them on). torchvision (only its image
    transforms are imported, for image loading) gets an empty stand-in when it is not installed."""
    try:
        importlib.import_module("torchvision")
    except Exception:  # missing, or a build that does not load beside this torch
        stand_in = types.ModuleType("torchvision")
        stand_in.transforms = types.ModuleType("torchvision.transforms")
        sys.modules["torchvision"], sys.modules["torchvision.transforms"] = stand_in, stand_in.transforms
    if DUST3R_DIR not in sys.path:
        sys.path.insert(0, DUST3R_DIR)
    flags = _global_flags()
    try:
        return importlib.import_module("dust3r.model").AsymmetricCroCo3DStereo
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, precision = flags
        torch.set_float32_matmul_precision(precision)


@functools.lru_cache(maxsize=1)
def models() -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(upstream model, patched copy). The copy shares every parameter and buffer object with the
    upstream model (only the module objects are copied), so both compute with the same weights."""
    torch.manual_seed(0)
    upstream = _model_class()(**CONFIG).eval().to(DEVICE)
    shared = {id(t): t for t in (*upstream.parameters(), *upstream.buffers())}
    patched = fastpatch.patch_model(copy.deepcopy(upstream, memo=shared))
    return upstream, patched


@functools.lru_cache(maxsize=2)
def inputs(batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    img = torch.randn(batch, 3, HEIGHT, WIDTH).clamp_(-1, 1).to(DEVICE)
    return img, torch.tensor([[HEIGHT, WIDTH]] * batch, device=DEVICE)


@functools.lru_cache(maxsize=1)
def compiled() -> Dict[str, object]:
    """``torch.compile`` of each model's ``_encode_image`` (compiled at the first call, in the warm-up)."""
    upstream, patched = models()
    return {EAGER_COMPILED: torch.compile(upstream._encode_image),
            FASTPATCH_COMPILED: torch.compile(patched._encode_image, fullgraph=True)}


def matmul_floor(model: torch.nn.Module):
    """``floor(img, true_shape) -> (tokens, None)``: the matrix products of ``model._encode_image`` alone.

    The patch-embedding convolution ``(B, 3, H, W) -> (B, N, C)``, then for every encoder block, with
    its weights: the qkv linear ``(B, N, C) -> (B, N, 3C)``, SDPA over its heads on strided views of it
    ``(B, h, N, C/h)``, the proj linear, fc1 ``(B, N, C) -> (B, N, 4C)`` and fc2 on fc1's output. Every
    block reads the patch tokens (chained without norms the activations would drift, and denormals
    would slow the GEMMs down); nothing else runs. Returns the last fc2 output.
    """
    blocks = list(model.enc_blocks)
    conv = model.patch_embed.proj

    def floor(img, true_shape):
        x = conv(img).flatten(2).transpose(1, 2).contiguous()
        batch, tokens, dim = x.shape
        out = None
        for block in blocks:
            attn, mlp = block.attn, block.mlp
            heads = attn.num_heads
            qkv = linear(x, attn.qkv.weight, attn.qkv.bias).view(batch, tokens, 3, heads, dim // heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            mixed = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
            linear(mixed.transpose(1, 2).reshape(batch, tokens, dim), attn.proj.weight, attn.proj.bias)
            out = linear(linear(x, mlp.fc1.weight, mlp.fc1.bias), mlp.fc2.weight, mlp.fc2.bias)
        return out, None
    return floor


def _encoder_output(call):
    @functools.wraps(call)
    def tokens(img, true_shape):
        return call(img, true_shape)[0]  # (x, pos, None): the tokens; pos is an integer grid
    return tokens


def build_sides(case: Case) -> Dict[str, Side]:
    upstream, patched = models()
    calls = {EAGER: upstream._encode_image, FASTPATCH: patched._encode_image, **compiled(),
             MATMUL_FLOOR: matmul_floor(upstream)}
    autocast = None if case.dtype == torch.float32 else case.dtype
    return {name: Side(make_step(_encoder_output(call), inputs(case.batch), case.mode, case.device, autocast=autocast))
            for name, call in calls.items()}


@functools.lru_cache(maxsize=1)
def cpu_description() -> Dict[str, str]:
    """``lscpu``'s model name and feature flags (empty strings where lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"cpu_model": "", "cpu_flags": ""}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {"cpu_model": fields.get("Model name", "").strip(), "cpu_flags": fields.get("Flags", "").strip()}


def float64_errors(case: Case, sides: Dict[str, Side]) -> Dict[str, float]:
    """max relative error of ``eager`` and ``fastpatch`` (float32) against a float64 copy of the upstream model."""
    upstream, _ = models()
    img, true_shape = inputs(case.batch)
    oracle_model = copy.deepcopy(upstream).double()
    with torch.inference_mode():
        oracle = oracle_model._encode_image(img.double(), true_shape)[0]
    del oracle_model
    return {f"max_rel_error_vs_float64_{name}": relative_error(sides[name]().float(), oracle)
            for name in (EAGER, FASTPATCH)}


def graph_breaks(case: Case) -> Dict[str, int]:
    """Graphs and graph breaks of ``torch._dynamo.explain`` on the patched ``_encode_image``."""
    _, patched = models()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(patched._encode_image)(*inputs(case.batch))
    return {"dynamo_graphs": explanation.graph_count, "dynamo_graph_breaks": explanation.graph_break_count}


CASE_PROVIDERS = [(case, provider) for case in CASES for provider in PROVIDERS]


@pytest.mark.parametrize("case,provider", CASE_PROVIDERS, ids=[f"{c.name}-{p}" for c, p in CASE_PROVIDERS])
def test_bench_upstream(benchmark, case, provider):
    benchmark.group = case.name
    sides = build_sides(case)
    extra = dict(cpu_description()) if DEVICE == "cpu" else {}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    measure(benchmark, case, provider, sides, flops.encoder(case.batch, TOKENS), rounds=ROUNDS, warmup_rounds=1,
            partners=PARTNERS[provider], baseline=None if provider == MATMUL_FLOOR else EAGER)
    if load_before is not None:  # the 1-minute load average: other processes on a shared machine
        extra["load_average_1min"] = [load_before, os.getloadavg()[0]]
    # After the timed rounds: the float64 oracle copies the whole model (~4.6 GB) and dynamo compiles,
    # neither of which may change the memory state the rounds run in.
    if provider == FASTPATCH and not benchmark.disabled:
        extra.update(float64_errors(case, sides))
    if provider == FASTPATCH_COMPILED and not benchmark.disabled:
        extra.update(graph_breaks(case))
    benchmark.extra_info.update(extra)
    if provider == FASTPATCH_COMPILED and not benchmark.disabled:
        assert extra["dynamo_graph_breaks"] == 0, "the patched encoder must trace as one graph"

"""Benchmarks of RoPE attention and the transformer blocks: eager reference vs torch path vs fastpatch.

Run: ``pytest bench/test_bench_attention.py`` (batch 1 only; ``FASTPATCH_BENCH_FULL=1`` adds batch 8
and, on CUDA, float32). Components use DUSt3R's sizes: self-attention and encoder Block at 1024
channels / 16 heads, cross-attention and DecoderBlock at 768 / 12 (head dim 64), on 196 tokens
(224x224 image, 14x14 grid) and 768 tokens (512x384, 24x32 grid).

Providers:

* ``eager``: :mod:`fastpatch.reference` modules (upstream's op order: separate RoPE pass, explicit
  softmax attention);
* ``torch_sdpa``: fastpatch modules forced onto the torch path (RoPE tables + SDPA);
* ``fastpatch``: fastpatch modules with the automatic choice (torch path on CPU, Triton on CUDA).

Each provider is timed with a partner run between its rounds (:func:`cases.run_side`: ``eager``'s
partner is ``fastpatch``, the others' is ``eager``), so both sides see the same load on a shared,
noisy CPU; ``benchmark.extra_info`` records ``partner_over_this`` (> 1: faster than the partner),
the max relative error of the output against ``eager`` (same weights, same inputs), peak CUDA
memory of one call, the CPU thread count and the case.
This file never sets ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Tuple

import pytest
import torch

import fastpatch
from fastpatch import reference

from cases import run_side, synchronize

FULL = os.environ.get("FASTPATCH_BENCH_FULL", "0") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = ([torch.bfloat16, torch.float32] if FULL else [torch.bfloat16]) if DEVICE.type == "cuda" else [torch.float32]
BATCHES = [1, 8] if FULL else [1]
GRIDS = {196: (14, 14), 768: (24, 32)}  # tokens -> (rows, cols)
ROUNDS = 10 if DEVICE.type == "cuda" else 3


@dataclass(frozen=True)
class Component:
    """One module under test: its class name in fastpatch / fastpatch.reference, width and heads."""

    name: str
    cls: str
    dim: int
    heads: int

    def build(self, namespace):
        rope = namespace.RoPE2D(freq=100.0)
        if self.cls in ("Attention", "CrossAttention"):
            return getattr(namespace, self.cls)(self.dim, rope=rope, num_heads=self.heads, qkv_bias=True)
        return getattr(namespace, self.cls)(self.dim, self.heads, qkv_bias=True, rope=rope)

    def inputs(self, batch: int, tokens: int, dtype: torch.dtype, requires_grad: bool) -> Tuple:
        rows, cols = GRIDS[tokens]
        k = torch.arange(tokens, device=DEVICE)
        pos = torch.stack((k // cols, k % cols), dim=-1).expand(batch, tokens, 2).contiguous()
        x = torch.randn(batch, tokens, self.dim, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
        if self.cls in ("Attention", "Block"):
            return (x, pos)
        y = torch.randn(batch, tokens, self.dim, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
        if self.cls == "CrossAttention":
            return (x, y, y, pos, pos.flip(1))
        return (x, y, pos, pos.flip(1))


COMPONENTS = {
    "attention": Component("attention", "Attention", 1024, 16),
    "cross_attention": Component("cross_attention", "CrossAttention", 768, 12),
    "block": Component("block", "Block", 1024, 16),
    "decoder_block": Component("decoder_block", "DecoderBlock", 768, 12),
}

PROVIDERS = {  # name -> (module namespace, backend context)
    "eager": (reference, contextlib.nullcontext),
    "torch_sdpa": (fastpatch, lambda: fastpatch.use_backend("torch")),
    "fastpatch": (fastpatch, lambda: fastpatch.use_backend("auto")),
}
PARTNER = {"eager": "fastpatch", "torch_sdpa": "eager", "fastpatch": "eager"}


def _first(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def make_step(module: torch.nn.Module, inputs: Tuple, mode: str, backend_context) -> Callable[[], torch.Tensor]:
    """One timed call: forward under no_grad, or forward + backward of a fixed upstream gradient."""
    if mode == "forward":
        def step():
            with torch.no_grad(), backend_context():
                out = _first(module(*inputs))
            synchronize(DEVICE.type)
            return out
    else:
        grad_out = None

        def step():
            nonlocal grad_out
            with backend_context():
                out = _first(module(*inputs))
                grad_out = torch.randn_like(out) if grad_out is None else grad_out
                out.backward(grad_out)
            synchronize(DEVICE.type)
            return out
    return step


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("tokens", list(GRIDS), ids=lambda n: f"n{n}")
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("component", list(COMPONENTS))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_bench_attention(benchmark, provider, component, mode, tokens, batch, dtype):
    spec = COMPONENTS[component]
    benchmark.group = f"{component}-{mode}-n{tokens}-b{batch}-{str(dtype).replace('torch.', '')}"
    torch.manual_seed(0)
    eager = spec.build(reference).to(DEVICE, dtype)
    inputs = spec.inputs(batch, tokens, dtype, requires_grad=(mode == "forward_backward"))
    steps = {}
    for name in (provider, PARTNER[provider]):
        namespace, backend_context = PROVIDERS[name]
        module = eager if name == "eager" else spec.build(namespace).to(DEVICE, dtype)
        module.load_state_dict(eager.state_dict())
        steps[name] = make_step(module, inputs, mode, backend_context)

    steps[provider]()  # warm-up, then one call for the peak memory
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps[provider]()
    peak_memory = torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else None
    run_side(benchmark, steps[provider], steps[PARTNER[provider]], reference=steps["eager"], rounds=ROUNDS,
             warmup_rounds=1)
    benchmark.extra_info.update(
        provider=provider, partner=PARTNER[provider], component=component, mode=mode, tokens=tokens, batch=batch,
        dtype=str(dtype), device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        cpu_threads=torch.get_num_threads(), peak_memory_bytes=peak_memory,
    )

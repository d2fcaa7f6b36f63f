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

``benchmark.extra_info`` records the case, the max relative error of the output against ``eager``
(same weights, same inputs), peak CUDA memory of one timed call, the CPU thread count and, for
``fastpatch``, ``speedup_vs_eager``: median eager time / median fastpatch time over calls that
alternate the two (the CPU is shared and noisy; interleaving keeps both sides under the same load).
This file never sets ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Tuple

import pytest
import torch

import fastpatch
from fastpatch import reference
from fastpatch.testing import relative_error

FULL = os.environ.get("FASTPATCH_BENCH_FULL", "0") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = ([torch.bfloat16, torch.float32] if FULL else [torch.bfloat16]) if DEVICE.type == "cuda" else [torch.float32]
BATCHES = [1, 8] if FULL else [1]
GRIDS = {196: (14, 14), 768: (24, 32)}  # tokens -> (rows, cols)
ROUNDS = 10 if DEVICE.type == "cuda" else 5
INTERLEAVED_PAIRS = 5


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


def _first(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def make_step(module: torch.nn.Module, inputs: Tuple, mode: str, backend_context) -> Callable[[], torch.Tensor]:
    """One timed call: forward under no_grad, or forward + backward of a fixed upstream gradient."""
    if mode == "forward":
        def step():
            with torch.no_grad(), backend_context():
                out = _first(module(*inputs))
            _sync()
            return out
    else:
        grad_out = None

        def step():
            nonlocal grad_out
            with backend_context():
                out = _first(module(*inputs))
                grad_out = torch.randn_like(out) if grad_out is None else grad_out
                out.backward(grad_out)
            _sync()
            return out
    return step


def _seconds(step: Callable) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def interleaved_speedup(eager_step: Callable, step: Callable) -> float:
    """Median eager time / median ``step`` time over alternating calls."""
    eager_times, times = [], []
    for _ in range(INTERLEAVED_PAIRS):
        eager_times.append(_seconds(eager_step))
        times.append(_seconds(step))
    return statistics.median(eager_times) / statistics.median(times)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("tokens", list(GRIDS), ids=lambda n: f"n{n}")
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("component", list(COMPONENTS))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_bench_attention(benchmark, provider, component, mode, tokens, batch, dtype):
    spec = COMPONENTS[component]
    torch.manual_seed(0)
    eager = spec.build(reference).to(DEVICE, dtype)
    namespace, backend_context = PROVIDERS[provider]
    module = eager if provider == "eager" else spec.build(namespace).to(DEVICE, dtype)
    module.load_state_dict(eager.state_dict())
    inputs = spec.inputs(batch, tokens, dtype, requires_grad=(mode == "forward_backward"))
    step = make_step(module, inputs, mode, backend_context)
    eager_step = make_step(eager, inputs, mode, contextlib.nullcontext)

    error = relative_error(step(), eager_step())  # also the warm-up of both sides
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        provider=provider, component=component, mode=mode, tokens=tokens, batch=batch, dtype=str(dtype),
        device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        cpu_threads=torch.get_num_threads(), max_rel_error_vs_eager=error,
        peak_memory_bytes=torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else None,
    )
    if provider == "fastpatch":
        benchmark.extra_info["speedup_vs_eager"] = interleaved_speedup(eager_step, step)

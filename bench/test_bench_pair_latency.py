"""Batch-1 latency of the full pair forward (both encodes + both decoder streams, no heads) of
``DUSt3R_ViTLarge_BaseDecoder_512`` at 512x384 under bf16 autocast on CUDA, with and without CUDA
graphs (issue 11, item 4; target: >= 2x vs eager, CUDA graphs allowed).

Providers, on the model and images of :mod:`bench.test_bench_model` (one model object, patched /
unpatched by each side's untimed ``prepare``), each timed with ``eager`` run before every round:

* ``eager``: the unpatched model; ``fastpatch``: the patched model (Triton kernels);
* ``fastpatch_cuda_graphs``: the patched pair forward captured once into a ``torch.cuda.CUDAGraph``
  by :class:`CapturedCall` (static input buffers; the capture happens in the untimed set-up of the
  first call); each timed call copies the two images into the static buffers and replays. Its
  ``fastpatch`` times are printed too (``partners``), so the log shows what graphs add to fastpatch.
  ``capture_bytes`` in ``extra_info`` is the device memory the capture kept (static buffers and
  the graph's private pool); its ``peak_memory_bytes`` is ~0, a replay allocates nothing;
* ``eager_compiled``: ``torch.compile`` of the eager model (default mode);
* ``fastpatch_compiled_graphs``: ``torch.compile(mode="reduce-overhead")`` of a patched copy of the
  model (cudagraph trees; a copy, so patching the shared model does not invalidate its guards).

The two compiled providers compile in their untimed warm-up, which for the ViT-L pair takes minutes;
they run only with ``FASTPATCH_BENCH_COMPILE=1`` (:func:`bench.test_bench_model.compiles`) and
come last, so a run cut short by a timeout keeps the other rows.

On CPU every row skips: CUDA graphs need CUDA, and the CPU pair forward, eager vs fastpatch, is
already :mod:`bench.test_bench_model`'s ``pair`` case.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence, Tuple

import pytest
import torch

import fastpatch

from . import flops
from .cases import BACKENDS, DEVICE, EAGER, FASTPATCH, Case, Side, make_step, measure, synchronize
from .test_bench_model import COMPILED, HEIGHT, TOKENS, WIDTH, compiles, images, model

__all__ = ["CapturedCall", "autocast_forward", "GRAPHS", "COMPILED_GRAPHS", "PROVIDERS"]

GRAPHS = "fastpatch_cuda_graphs"
COMPILED_GRAPHS = "fastpatch_compiled_graphs"
PROVIDERS = [EAGER, FASTPATCH, GRAPHS, COMPILED, COMPILED_GRAPHS]  # compiled last (see above)
CASE = Case("pair", "forward", f"{HEIGHT}x{WIDTH}", 1, torch.bfloat16, DEVICE)
ROUNDS, WARMUP_ROUNDS = 10, 2


class CapturedCall:
    """``fn(*inputs)`` captured once into a :class:`torch.cuda.CUDAGraph` on static copies of ``inputs``.

    Capture follows torch's recipe: ``warmup`` eager calls on a side stream first (they compile the
    Triton kernels and fill fastpatch's per-device caches: launch plans, RoPE frequency tables),
    then one call captured under :func:`torch.cuda.graph`. ``fn`` must neither read device values
    on the host nor copy host data to the device (a ManyAR ``true_shape`` goes on the device, as one
    of the inputs). Calling the object copies new inputs (same shapes) into the static buffers and
    replays on the current stream; it returns the graph's static outputs, which the next replay
    overwrites (clone what you keep).

    Args:
        fn: a function of CUDA tensors (the grad mode and autocast it needs entered inside it; for
            autocast pass ``cache_enabled=False``, as torch asks for graphs).
        inputs: the example inputs, CUDA tensors; copied, so the caller's tensors are not captured.
    """

    def __init__(self, fn: Callable[..., object], inputs: Sequence[torch.Tensor], warmup: int = 2):
        self.static_inputs: Tuple[torch.Tensor, ...] = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"the graph was captured with {len(self.static_inputs)} inputs, got {len(inputs)}")
        for i, (static, new) in enumerate(zip(self.static_inputs, inputs)):
            if new.shape != static.shape:
                raise ValueError(f"input {i} has shape {tuple(new.shape)}; the graph was captured with "
                                 f"{tuple(static.shape)}")
            static.copy_(new)
        self.graph.replay()
        return self.static_outputs


def autocast_forward(net: torch.nn.Module, dtype: torch.dtype) -> Callable[..., object]:
    """``net(*inputs)`` under ``inference_mode`` and CUDA autocast to ``dtype`` with its cast cache off."""
    def forward(*inputs):
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, cache_enabled=False):
            return net(*inputs)
    return forward


def _graph_side(net: torch.nn.Module, inputs, dtype: torch.dtype, info: dict) -> Side:
    """The patched pair forward, captured at the first ``prepare`` (untimed), replayed by ``run``."""
    captured = []

    def prepare():
        fastpatch.patch_model(net)
        if not captured:
            synchronize("cuda")
            before = torch.cuda.memory_allocated()
            captured.append(CapturedCall(autocast_forward(net, dtype), inputs))
            synchronize("cuda")
            info["capture_bytes"] = torch.cuda.memory_allocated() - before

    def run():
        out = captured[0](*inputs)
        synchronize("cuda")
        return out

    return Side(run, prepare=prepare)


def _compiled_graphs_side(net: torch.nn.Module, inputs, dtype: torch.dtype) -> Side:
    """``torch.compile(mode="reduce-overhead")`` of a patched copy of ``net`` (cudagraph trees).

    Compiles and records at its first calls (the untimed warm-up). ``no_grad`` rather than
    ``inference_mode`` and a step mark before each call: the usage torch documents for cudagraph
    trees in inference.
    """
    fastpatch.unpatch_model(net)
    compiled = torch.compile(fastpatch.patch_model(copy.deepcopy(net)), mode="reduce-overhead")

    def run():
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            out = compiled(*inputs)
        synchronize("cuda")
        return out

    return Side(run)


def build_sides(case: Case, provider: str, info: dict):
    """``eager`` and ``fastpatch`` (both always: the partners) plus ``provider``'s side."""
    net = model()
    inputs = images(case.batch)

    def unpatch():
        fastpatch.unpatch_model(net)

    def patch():
        fastpatch.patch_model(net)

    sides = {name: Side(make_step(net, inputs, case.mode, case.device, BACKENDS[name], autocast=case.dtype),
                        prepare=unpatch if name == EAGER else patch)
             for name in (EAGER, FASTPATCH)}
    if provider == GRAPHS:
        sides[GRAPHS] = _graph_side(net, inputs, case.dtype, info)
    elif provider == COMPILED:
        sides[COMPILED] = Side(make_step(torch.compile(net), inputs, case.mode, case.device, autocast=case.dtype),
                               prepare=unpatch)
    elif provider == COMPILED_GRAPHS:
        sides[COMPILED_GRAPHS] = _compiled_graphs_side(net, inputs, case.dtype)
    return sides


def _skip_reason(provider: str):
    if DEVICE != "cuda":
        return ("CPU: CUDA graphs need CUDA; the CPU pair forward, eager vs fastpatch, is "
                "bench/test_bench_model.py's pair case")
    if provider in (COMPILED, COMPILED_GRAPHS) and not compiles(CASE.component):
        return "compiling the ViT-L pair takes minutes: set FASTPATCH_BENCH_COMPILE=1 to run it"
    return None


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_pair_latency(benchmark, provider):
    reason = _skip_reason(provider)
    if reason is not None:
        pytest.skip(reason)
    benchmark.group = CASE.name
    info: dict = {}
    sides = build_sides(CASE, provider, info)
    partners = [EAGER, FASTPATCH] if provider == GRAPHS else None
    measure(benchmark, CASE, provider, sides, flops.pair(CASE.batch, TOKENS), rounds=ROUNDS,
            warmup_rounds=WARMUP_ROUNDS, partners=partners)
    benchmark.extra_info.update(info)

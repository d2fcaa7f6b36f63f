"""Shared structure of the fastpatch benchmarks (pytest-benchmark).

A benchmark file defines its :class:`Case` list and, per case, a dict of :class:`Side` objects
(provider name -> a prepared, device-synchronised call on shared weights and inputs), then one test
parametrised over ``(case, provider)`` that calls :func:`measure`. Provider names:

* ``eager``: :mod:`fastpatch.reference` (upstream's op order; the default baseline of ratios and errors);
* ``torch_path``: fastpatch under ``use_backend("torch")`` (RoPE tables + SDPA, reshape + addmm);
  measured on CUDA only: on CPU it is exactly what ``fastpatch`` runs;
* ``fastpatch``: the automatic choice (torch path on CPU, Triton kernels on CUDA);
* file-specific extras (``triton_in_loop`` / ``triton_pre_rotated``, ``eager_compiled``).

:func:`measure` times the provider with its comparison sides (``eager``, and ``torch_path`` where it
exists) run and timed before each of its rounds: interleaved, so all sides see the same load on a
shared, noisy machine. It records in ``benchmark.extra_info`` what ``bench/report.py`` reads.

``FASTPATCH_BENCH_FULL=1`` selects the full matrix (GPU sizes: batch 8, float32 + bfloat16, every
component); the default is sized to finish in minutes on a 2-core CPU.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import fastpatch
from fastpatch.testing import relative_error

__all__ = ["FULL", "DEVICE", "BACKENDS", "EAGER", "TORCH_PATH", "FASTPATCH", "Case", "Side", "base_providers", "device_name",
           "dtype_name", "synchronize", "make_step", "measure"]

FULL = os.environ.get("FASTPATCH_BENCH_FULL", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EAGER, TORCH_PATH, FASTPATCH = "eager", "torch_path", "fastpatch"
BACKENDS = {EAGER: None, TORCH_PATH: "torch", FASTPATCH: "auto"}  # fastpatch backend each provider runs


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def device_name(device: str = DEVICE) -> str:
    """The GPU's name (``torch.cuda.get_device_name``), or ``"cpu"``."""
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def base_providers(device: str = DEVICE) -> List[str]:
    """``eager``, ``torch_path`` (CUDA only: on CPU it is ``fastpatch``), ``fastpatch``."""
    return [EAGER] + ([TORCH_PATH] if device == "cuda" else []) + [FASTPATCH]


def synchronize(device: str) -> None:
    """Wait for queued device work (a no-op on CPU) so wall-clock timings are honest."""
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration; ``name`` is its id in tests, JSON and report."""

    component: str  # "patch_embed", "block", "encoder", ...
    mode: str  # "forward" or "forward_backward"
    size: str  # "384x512" (image H x W) or "n768" (tokens)
    batch: int
    dtype: torch.dtype  # working dtype (the autocast dtype for whole models)
    device: str

    @property
    def name(self) -> str:
        return f"{self.component}-{self.mode}-{self.size}-b{self.batch}-{dtype_name(self.dtype)}-{self.device}"


@dataclass
class Side:
    """One provider's call: ``run()`` (timed, synchronised, returns the output) after ``prepare()`` (untimed)."""

    run: Callable[[], Any]
    prepare: Callable[[], None] = lambda: None

    def __call__(self) -> Any:
        self.prepare()
        return self.run()


def _backend_context(backend: Optional[str]):
    return contextlib.nullcontext() if backend is None else fastpatch.use_backend(backend)


def _tensors(output: Any) -> List[torch.Tensor]:
    """Every tensor in a (nested) tuple/list output, in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in output for t in _tensors(item)] if isinstance(output, (tuple, list)) else []


def make_step(call: Callable[..., Any], inputs: Sequence[Any], mode: str, device: str, backend: Optional[str] = None,
              params: Sequence[torch.Tensor] = (), autocast: Optional[torch.dtype] = None) -> Callable[[], Any]:
    """A synchronised call of ``call(*inputs)`` under ``use_backend(backend)`` (None: no override).

    ``"forward"`` runs under ``torch.inference_mode`` (and ``torch.autocast(device, autocast)`` when
    given) and returns the output; ``"forward_backward"``
    back-propagates a fixed upstream gradient (seeded, the same for every provider) from the first
    output tensor to the inputs that require grad and ``params``, with ``torch.autograd.grad`` (no
    accumulation between rounds), and returns ``(output, *gradients)``.
    """
    if mode == "forward":
        def forward():
            with torch.inference_mode(), _backend_context(backend), \
                    torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
                out = call(*inputs)
            synchronize(device)
            return out
        return forward
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad] + list(params)
    grad_out: List[torch.Tensor] = []

    def forward_backward():
        with _backend_context(backend):
            out = _tensors(call(*inputs))[0]
            if not grad_out:
                generator = torch.Generator().manual_seed(1)
                grad_out.append(torch.randn(out.shape, generator=generator).to(out.device, out.dtype))
            grads = torch.autograd.grad(out, wrt, grad_out[0])
        synchronize(device)
        return (out.detach(), *grads)
    return forward_backward


def _max_error(output: Any, reference: Any) -> float:
    return max(relative_error(a.float(), e.float()) for a, e in zip(_tensors(output), _tensors(reference)))


def _peak_memory(side: Side, device: str) -> Optional[int]:
    """Bytes allocated above the resting level during one call (CUDA); None on CPU."""
    if device != "cuda":
        return None
    side()  # warm-up: Triton/inductor compilation, allocator
    torch.cuda.synchronize()
    resting = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    side()
    return torch.cuda.max_memory_allocated() - resting


def measure(benchmark, case: Case, provider: str, sides: Dict[str, Side], flops: Optional[float], rounds: int,
            warmup_rounds: int = 1, partners: Optional[Sequence[str]] = None,
            baseline: Optional[str] = EAGER) -> None:
    """Benchmark ``sides[provider]`` interleaved with its comparison sides and record the results.

    Before each round (warm-up rounds included) ``eager`` and, for providers other than these two,
    ``torch_path`` (when in ``sides``) run once each, timed. ``partners`` replaces that default list
    (any side names: each also gets the ``<partner>_*`` / ``vs_<partner>`` fields below) and
    ``baseline``, one of them, is the side errors are measured against (another than ``eager`` gives
    ``max_rel_error_vs_<baseline>`` and ``error_baseline``; None: the provider computes something else,
    e.g. a time floor, and records no error). ``benchmark.extra_info`` gets: the case
    fields, ``provider``, ``device``, ``dtype``, ``flops``, ``cpu_threads``, ``peak_memory_bytes``
    (CUDA max_memory_allocated delta of one call; None on CPU), ``max_rel_error_vs_eager`` (every
    output tensor against eager's, :func:`fastpatch.testing.relative_error`), ``ms_per_round`` and,
    for ``eager`` / ``torch_path``, ``<side>_ms_per_round`` (the partner's call just before each
    round), ``<side>_median_ms`` and ``vs_<side>``: the median over rounds of partner time / this
    time (paired, so a load change between rounds cancels out; > 1 means this provider is faster).
    For ``eager`` itself the eager fields describe its own rounds (ratio 1).
    """
    if partners is None:
        default = [name for name in (EAGER, TORCH_PATH) if name in sides and name != provider]
        partners = [] if provider == EAGER else default
    times: Dict[str, List[float]] = {name: [] for name in partners}
    eager_output: List[Any] = []  # the baseline's output

    def run_partners():
        for name in partners:
            sides[name].prepare()
            start = time.perf_counter()
            output = sides[name].run()
            times[name].append(time.perf_counter() - start)
            if name == baseline:
                eager_output[:] = [output]
        sides[provider].prepare()

    peak_memory = _peak_memory(sides[provider], case.device)
    output = benchmark.pedantic(sides[provider].run, setup=run_partners, rounds=rounds, warmup_rounds=warmup_rounds)
    if benchmark.disabled:
        return
    this_ms = [t * 1e3 for t in benchmark.stats.stats.data]
    rounds_ms = {name: [t * 1e3 for t in samples[-rounds:]] for name, samples in times.items()}
    rounds_ms[provider] = this_ms
    ratios = {name: statistics.median(p / t for p, t in zip(samples, this_ms)) for name, samples in rounds_ms.items()}
    if baseline is None:
        error = None
    else:
        error = 0.0 if provider == baseline else _max_error(output, eager_output[0])
    info = dict(case=case.name, component=case.component, mode=case.mode, size=case.size, batch=case.batch,
                provider=provider, device=device_name(case.device), dtype=dtype_name(case.dtype), flops=flops,
                cpu_threads=torch.get_num_threads(), rounds=rounds, peak_memory_bytes=peak_memory,
                ms_per_round=_rounded(this_ms))
    info[f"max_rel_error_vs_{baseline or EAGER}"] = error
    if baseline not in (EAGER, None):
        info["error_baseline"] = baseline
    named_partners = [(p, p) for p in partners if p not in (EAGER, TORCH_PATH)]
    for name, key in ((EAGER, "eager"), (TORCH_PATH, "torch_path"), *named_partners):
        samples = rounds_ms.get(name)
        info.update({f"{key}_ms_per_round": None if samples is None else _rounded(samples),
                     f"{key}_median_ms": None if samples is None else round(statistics.median(samples), 4),
                     f"vs_{key}": None if samples is None else round(ratios[name], 4)})
    benchmark.extra_info.update(info)
    this_median = statistics.median(this_ms)
    others = "".join(f"; {name} {statistics.median(rounds_ms[name]):.3f} ms (x{ratios[name]:.2f})" for name in partners)
    checked = "no error (not the same function)" if error is None else f"max rel error vs {baseline} {error:.2e}"
    print(f"\n{case.name} [{provider}]: {this_median:.3f} ms{others}; {checked}")


def _rounded(samples: List[float]) -> List[float]:
    return [round(ms, 4) for ms in samples]

"""Shared structure of the fastpatch benchmarks (pytest-benchmark).

A benchmark file defines:

* its :class:`Case` list (name, batch, image size, dtype, device), built with :func:`image_cases`;
* a ``providers`` dict: provider name -> factory ``factory(case, shared) -> run``, where ``run`` is a
  zero-argument callable running the op once (device-synchronised) on prepared inputs and
  ``shared`` holds what both sides must share (weights, images);
* one test parametrised over ``(case, provider)`` that calls :func:`run_side`.

:func:`run_side` times one provider with another (its *partner*) run between its rounds
(interleaved, so both sides see the same machine load), records the partner's median and the
ratio in ``benchmark.extra_info``, and the provider's maximum relative error against the eager
reference (:func:`fastpatch.testing.relative_error`). Run: ``pytest bench/ --benchmark-only``.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence

import torch

from fastpatch.testing import relative_error

__all__ = ["Case", "image_cases", "devices", "synchronize", "run_side"]


@dataclass(frozen=True)
class Case:
    """One benchmark input: a (batch, 3, height, width) image batch in ``dtype`` on ``device``."""

    batch: int
    height: int
    width: int
    dtype: torch.dtype
    device: str

    @property
    def name(self) -> str:
        return f"{self.device}-{str(self.dtype).replace('torch.', '')}-{self.height}x{self.width}-b{self.batch}"


def devices() -> List[str]:
    """``["cpu"]``, plus ``"cuda"`` when a GPU is available."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def image_cases(sizes: Sequence[tuple], batches: Sequence[int], dtypes_per_device: Dict[str, Sequence[torch.dtype]]) -> List[Case]:
    """Every (device, dtype, size, batch) combination for the available devices."""
    return [Case(batch, height, width, dtype, device)
            for device in devices() for dtype in dtypes_per_device[device]
            for height, width in sizes for batch in batches]


def synchronize(device: str) -> None:
    """Wait for queued device work (a no-op on CPU) so wall-clock timings are honest."""
    if device == "cuda":
        torch.cuda.synchronize()


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def run_side(benchmark, run: Callable[[], Any], partner: Callable[[], Any], reference: Callable[[], Any],
             rounds: int, warmup_rounds: int = 2) -> Any:
    """Benchmark ``run`` with ``partner`` run (and timed) once before each of its rounds.

    Records in ``benchmark.extra_info``: ``partner_median_ms``, ``partner_over_this`` (partner
    median / this median: > 1 means this side is faster) and ``max_rel_error_vs_eager`` of the first
    output tensor against ``reference()``. Returns the output of ``run``.
    """
    partner_times: List[float] = []

    def time_partner():
        start = time.perf_counter()
        partner()
        partner_times.append(time.perf_counter() - start)

    output = benchmark.pedantic(run, setup=time_partner, rounds=rounds, warmup_rounds=warmup_rounds)
    partner_ms = statistics.median(partner_times[-rounds:]) * 1e3
    this_ms = benchmark.stats.stats.median * 1e3
    error = relative_error(_first_tensor(output), _first_tensor(reference()))
    benchmark.extra_info.update(partner_median_ms=round(partner_ms, 4), partner_over_this=round(partner_ms / this_ms, 3),
                                max_rel_error_vs_eager=error)
    print(f"\n{benchmark.name}: {this_ms:.3f} ms; partner {partner_ms:.3f} ms (x{partner_ms / this_ms:.2f}); "
          f"max rel error vs eager {error:.2e}")
    return output

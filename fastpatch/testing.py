"""Shared numerics for tests, benchmarks and the self-check: per-dtype tolerances and the error metric.

Every comparison in the test suite and every "max error" figure in the benchmarks uses
:func:`relative_error` against a float64 reference computed from the *same* (already rounded)
inputs, and checks it against :data:`TOLERANCES`. This module is the one place those numbers live.
(The ahead-of-time compile helpers the tests and benchmarks use are not installed: ``fastpatch_dev/``
in the repository.)

Why these values (unit roundoff u: fp32 6.0e-8, fp16 4.9e-4, bf16 3.9e-3):

* float64: the torch path and the probes of :mod:`fastpatch.patching.probes` (u = 1.1e-16): a
  few thousand roundings at most, well inside 1e-12.
* float32: the kernels accumulate in fp32, so errors are a few ulps of the largest entry
  times sqrt(reduction length); 1e-5 is the bar the issues set for parity with upstream.
* float16 / bfloat16: the output is rounded to the storage dtype (1 u), and attention
  additionally rounds the probabilities to the storage dtype before the P @ V product (another
  u, amplified by at most ~2 by cancellation). Backward passes chain two more rounded products.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

__all__ = ["Tolerance", "TOLERANCES", "relative_error", "assert_close_to_reference"]


@dataclass(frozen=True)
class Tolerance:
    """Maximum :func:`relative_error` allowed for a forward output and for a gradient."""

    forward: float
    backward: float


#: Keyed by working dtype, plus ``"tf32"``: float32 computed on TF32 tensor cores (operands rounded to a
#: 10-bit mantissa, u = 4.9e-4 like fp16, fp32 accumulation and storage): the fp16 bounds. It applies
#: to float32 results where TF32 really ran (compiled kernels on a GPU with torch's TF32 switch on).
TOLERANCES: Dict[object, Tolerance] = {
    torch.float64: Tolerance(forward=1e-12, backward=1e-12),
    torch.float32: Tolerance(forward=1e-5, backward=1e-5),
    torch.float16: Tolerance(forward=2e-3, backward=5e-3),
    torch.bfloat16: Tolerance(forward=1.6e-2, backward=4e-2),
    "tf32": Tolerance(forward=2e-3, backward=5e-3),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, computed in float64 on ``actual``'s device.

    Normalising by the largest reference entry (not element-wise) keeps the metric meaningful for
    entries near zero. Returns the absolute error when ``expected`` is all zeros.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    a = actual.detach().to(dtype=torch.float64)  # on actual's device: no copy of GPU results to the host
    e = expected.detach().to(device=a.device, dtype=torch.float64)
    if a.numel() == 0:
        return 0.0
    if not torch.isfinite(a).all():
        return float("inf")
    err = (a - e).abs().max().item()
    scale = e.abs().max().item()
    return err / scale if scale > 0 else err


def assert_close_to_reference(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
    *,
    kind: str = "forward",
    what: str = "output",
) -> None:
    """Assert ``relative_error(actual, expected)`` is within the tolerance of ``dtype``.

    Args:
        actual: tensor produced by fastpatch (any dtype/device).
        expected: float64 reference from the same rounded inputs.
        dtype: the working dtype whose tolerance applies (default: ``actual.dtype``).
        kind: ``"forward"`` or ``"backward"``.
        what: name used in the failure message.
    """
    dtype = actual.dtype if dtype is None else dtype
    tol = getattr(TOLERANCES[dtype], kind)
    err = relative_error(actual, expected)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3e} exceeds the {dtype} {kind} tolerance {tol:.1e}")

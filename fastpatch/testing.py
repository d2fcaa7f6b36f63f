"""Shared numerics for tests and benchmarks: per-dtype tolerances and the error metric.

Every comparison in the test suite and every "max error" figure in the benchmarks uses
:func:`relative_error` against a float64 reference computed from the *same* (already rounded)
inputs, and checks it against :data:`TOLERANCES`. This module is the one place those numbers live.

Why these values (unit roundoff u: fp32 6.0e-8, fp16 4.9e-4, bf16 3.9e-3):

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

__all__ = ["Tolerance", "TOLERANCES", "relative_error", "assert_close_to_reference", "compile_for_gpu"]


@dataclass(frozen=True)
class Tolerance:
    """Maximum :func:`relative_error` allowed for a forward output and for a gradient."""

    forward: float
    backward: float


TOLERANCES: Dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(forward=1e-5, backward=1e-5),
    torch.float16: Tolerance(forward=2e-3, backward=5e-3),
    torch.bfloat16: Tolerance(forward=1.6e-2, backward=4e-2),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, computed in float64.

    Normalising by the largest reference entry (not element-wise) keeps the metric meaningful for
    entries near zero. Returns the absolute error when ``expected`` is all zeros.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
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


def compile_for_gpu(kernel, signature: Dict[str, str], constexprs: Dict[str, object], capability: int, num_warps: int = 4,
                    num_stages: int = 3):
    """Compile a ``@triton.jit`` kernel ahead of time for ``sm_<capability>`` without a GPU.

    Args:
        kernel: the jitted function.
        signature: argument name -> Triton type string (``"*fp16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``).
        constexprs: values of the ``constexpr`` arguments.
        capability: 80 (A100) or 90 (H100).

    Returns:
        The compiled kernel; ``.asm["ptx"]`` holds the PTX (``wgmma`` marks Hopper tensor cores),
        ``.metadata.shared`` the shared memory in bytes.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)

"""``python -m fastpatch``: the self-check to paste into a bug report.

It prints, in this order:

1. versions (fastpatch, python, torch and its CUDA, triton or why it does not import), the
   environment variables fastpatch reads, and the devices (each GPU's name, capability, memory);
2. which backend each op (``rope_attention``, ``patch_embed``) would use on each device, and why,
   as :func:`fastpatch.backend.decide` decides it for tensors on that device, plus which calls the
   kernels leave to the torch path;
3. wherever that backend is ``triton`` (CUDA; CPU under ``TRITON_INTERPRET=1``, through the
   interpreter), a check of every kernel against the torch path: attention forward and backward
   (cross-attention shapes, head dim 64) and the patch embedding forward and backward, plain and
   ManyAR (a portrait sample, ``true_shape`` on the CPU), each in float16, bfloat16 and float32
   (IEEE: TF32 switched off for the check). Each result is the max :func:`~fastpatch.testing.relative_error`
   over the outputs (forward) or the gradients (backward) against a float64 torch-path reference
   from the same rounded inputs, judged by :data:`~fastpatch.testing.TOLERANCES`.

:func:`main` returns 0 when every check passes, 1 on any failed check, any error raised, or a
backend that cannot run where it is forced. Shapes are tiny: a few seconds on a GPU (mostly the
first compile of each kernel), under a minute in the interpreter.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from . import __version__
from .backend import OPS, decide, use_backend
from .kernels.patch_embed_configs import DTYPES as PATCH_EMBED_DTYPES
from .kernels.rope_attention_configs import DTYPES as ATTENTION_DTYPES
from .kernels.rope_attention_configs import HEAD_DIMS
from .ops.patch_embed import patch_embed
from .ops.qknorm_rope_attention import qknorm_rope_attention
from .ops.rope_attention import rope_attention
from .testing import TOLERANCES, relative_error
from .triton_available import triton_import_error

__all__ = ["CheckResult", "main", "backend_choice", "kernel_checks", "devices"]

CHECK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIM = 64
PATCH = 16


@dataclass(frozen=True)
class CheckResult:
    """One kernel check: ``error`` is the max relative error, ``None`` when the check raised (see ``note``)."""

    name: str
    dtype: torch.dtype
    error: Optional[float]
    tolerance: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.error is not None and self.error <= self.tolerance


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _triton_version() -> str:
    reason = triton_import_error()
    if reason is not None:
        return f"not importable ({reason})"
    import triton

    return triton.__version__


def environment_lines() -> List[str]:
    """Versions, fastpatch's environment variables and the accelerators, one fact per line."""
    cuda = torch.version.cuda or "none (CPU-only build)"
    lines = [
        f"fastpatch {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__} (CUDA build {cuda})",
        f"triton {_triton_version()}",
    ]
    for name in ("FASTPATCH_BACKEND", "TRITON_INTERPRET"):
        lines.append(f"{name}={os.environ.get(name, '')!r}" + ("" if name in os.environ else " (unset)"))
    return lines


def devices() -> List[torch.device]:
    """CPU, every visible CUDA device, and MPS where available."""
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append(torch.device("mps"))
    return found


def _describe(device: torch.device) -> str:
    if device.type != "cuda":
        return str(device)
    props = torch.cuda.get_device_properties(device)
    return (f"{device}: {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
            f"{props.multi_processor_count} SMs")


def backend_choice(device: torch.device, op: str = OPS[0]) -> Tuple[str, str]:
    """``(backend, why)`` for ``op``'s tensors on ``device``, from :func:`fastpatch.backend.decide`;
    backend is ``"error"`` where the op would raise."""
    with warnings.catch_warnings(record=True):  # the no-triton warning: its reason is given as the why
        warnings.simplefilter("always")
        try:
            decision = decide(op, torch.empty(0, device=device))
        except (RuntimeError, ValueError) as exc:
            return "error", str(exc)
    return decision.backend, decision.reason


def _coverage_lines() -> List[str]:
    def names(dtypes: Sequence[torch.dtype]) -> str:
        return "/".join(_dtype_name(d) for d in dtypes)

    return [
        f"rope_attention kernels: head dims {'/'.join(map(str, HEAD_DIMS))}, {names(ATTENTION_DTYPES)}, no dropout; "
        "other calls run the torch path with a RuntimeWarning",
        f"patch_embed kernels: {names(PATCH_EMBED_DTYPES)}; other dtypes run the torch path",
        f"qknorm_rope_attention kernels: as rope_attention's (head dims {'/'.join(map(str, HEAD_DIMS))}, "
        f"{names(ATTENTION_DTYPES)}, no dropout)",
    ]


@contextlib.contextmanager
def _ieee_fp32() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN inside the block (restored after), so fp32 is checked at fp32 accuracy."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _grid(rows: int, cols: int, batch: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack((ys, xs), dim=-1).reshape(1, rows * cols, 2).expand(batch, -1, -1).contiguous()


def _on_triton(fn: Callable[[], Tuple[torch.Tensor, ...]]) -> Tuple[torch.Tensor, ...]:
    """Run ``fn`` with the Triton backend forced; a fallback to the torch path is an error here."""
    with use_backend("triton"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = fn()
    fallbacks = [str(w.message) for w in caught if "torch path" in str(w.message)]
    if fallbacks:
        raise RuntimeError(f"the kernel did not run: {fallbacks[0]}")
    return outputs


def _max_error(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    return max(relative_error(a, e) for a, e in zip(actual, expected))


def _attention_checks(device: torch.device, dtype: torch.dtype) -> List[CheckResult]:
    """Cross-attention (Nq = 40 on a 5x8 grid, Nk = 24 on a 4x6 grid), forward and backward."""
    gen = torch.Generator().manual_seed(0)
    batch, heads = 1, 2
    q, k, v, grad = (torch.randn(batch, heads, n, HEAD_DIM, generator=gen).to(dtype) for n in (40, 24, 24, 40))
    q_pos, k_pos = _grid(5, 8, batch), _grid(4, 6, batch)

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    with use_backend("torch"):
        ref = rope_attention(*leaves, q_pos, k_pos)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())

    inputs = [t.to(device).requires_grad_() for t in (q, k, v)]

    def run() -> Tuple[torch.Tensor, ...]:
        out = rope_attention(*inputs, q_pos.to(device), k_pos.to(device))
        return (out, *torch.autograd.grad(out, inputs, grad.to(device)))

    out, *grads = _on_triton(run)
    tol = TOLERANCES[dtype]
    return [CheckResult("rope_attention forward", dtype, _max_error([out], [ref]), tol.forward),
            CheckResult("rope_attention backward (dq, dk, dv)", dtype, _max_error(grads, ref_grads), tol.backward)]


def _qknorm_attention_checks(device: torch.device, dtype: torch.dtype) -> List[CheckResult]:
    """VGGT-style global attention: 2 frames of 5 special tokens + a 3x4 patch grid (34 tokens), the
    positions given by the grid, forward and backward (q, k, v and the four LayerNorm parameters)."""
    gen = torch.Generator().manual_seed(2)
    grid, tokens, heads = (3, 4, 5), 34, 2
    q, k, v, grad = (torch.randn(1, heads, tokens, HEAD_DIM, generator=gen).to(dtype) for _ in range(4))
    norms = [torch.randn(HEAD_DIM, generator=gen) * 0.2 + centre for centre in (1.0, 0.0, 1.0, 0.0)]
    names = ("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias")

    leaves = [t.double().requires_grad_() for t in (q, k, v, *norms)]
    with use_backend("torch"):
        ref = qknorm_rope_attention(*leaves[:3], **dict(zip(names, leaves[3:])), grid=grid)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())

    inputs = [t.to(device).requires_grad_() for t in (q, k, v, *norms)]

    def run() -> Tuple[torch.Tensor, ...]:
        out = qknorm_rope_attention(*inputs[:3], **dict(zip(names, inputs[3:])), grid=grid)
        return (out, *torch.autograd.grad(out, inputs, grad.to(device)))

    out, *grads = _on_triton(run)
    tol = TOLERANCES[dtype]
    return [CheckResult("qknorm_rope_attention forward", dtype, _max_error([out], [ref]), tol.forward),
            CheckResult("qknorm_rope_attention backward (q, k, v, norms)", dtype, _max_error(grads, ref_grads),
                        tol.backward)]


def _patch_embed_checks(device: torch.device, dtype: torch.dtype, many_ar: bool) -> List[CheckResult]:
    """Two 32x48 images (ManyAR: the second one portrait, stored transposed), 64 channels, forward and backward."""
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, 32, 48, generator=gen).to(dtype)
    weight = (torch.randn(64, 3, PATCH, PATCH, generator=gen) * 0.05).to(dtype)
    bias = torch.randn(64, generator=gen).to(dtype)
    true_shape = torch.tensor([[32, 48], [48, 32]]) if many_ar else None  # stays on the CPU, as in dust3r
    grad = torch.randn(2, 6, 64, generator=gen).to(dtype)

    leaves = [t.double().requires_grad_() for t in (img, weight, bias)]
    with use_backend("torch"):
        ref, ref_pos = patch_embed(*leaves, PATCH, true_shape, many_ar)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())

    inputs = [t.to(device).requires_grad_() for t in (img, weight, bias)]

    def run() -> Tuple[torch.Tensor, ...]:
        tokens, pos = patch_embed(*inputs, PATCH, true_shape, many_ar)
        return (tokens, pos, *torch.autograd.grad(tokens, inputs, grad.to(device)))

    tokens, pos, *grads = _on_triton(run)
    name = "patch_embed ManyAR" if many_ar else "patch_embed"
    tol = TOLERANCES[dtype]
    forward_error = _max_error([tokens], [ref]) if torch.equal(pos.cpu(), ref_pos) else float("inf")
    note = "" if torch.equal(pos.cpu(), ref_pos) else "positions differ"
    return [CheckResult(f"{name} forward", dtype, forward_error, tol.forward, note),
            CheckResult(f"{name} backward (img, weight, bias)", dtype, _max_error(grads, ref_grads), tol.backward)]


def kernel_checks(device: torch.device) -> Iterator[CheckResult]:
    """Every kernel on ``device`` against the float64 torch path, one result per (kernel, dtype).

    A check that raises yields a failed result with the exception in ``note``.
    """
    groups = [("rope_attention", lambda dt: _attention_checks(device, dt)),
              ("patch_embed", lambda dt: _patch_embed_checks(device, dt, many_ar=False)),
              ("patch_embed ManyAR", lambda dt: _patch_embed_checks(device, dt, many_ar=True)),
              ("qknorm_rope_attention", lambda dt: _qknorm_attention_checks(device, dt))]
    for name, check in groups:
        for dtype in CHECK_DTYPES:
            try:
                with _ieee_fp32():
                    yield from check(dtype)
            except Exception as exc:  # reported as a failed check, with the reason
                yield CheckResult(f"{name} forward + backward", dtype, None, TOLERANCES[dtype].forward,
                                  f"raised {type(exc).__name__}: {exc}")


def _result_line(result: CheckResult) -> str:
    verdict = "PASS" if result.passed else "FAIL"
    error = "error" if result.error is None else f"{result.error:.1e}"
    note = f"  {result.note}" if result.note else ""
    return (f"  {result.name:<48} {_dtype_name(result.dtype):<9} max rel err {error:>7} "
            f"(tol {result.tolerance:.1e})  {verdict}{note}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the self-check; return 0 when everything passed, else 1."""
    argparse.ArgumentParser(prog="python -m fastpatch", description=(
        "Print versions, devices, the backend each op would use on each device and why, and check every "
        "Triton kernel against the torch path where the kernels run; exit 1 on any failure.")).parse_args(argv)
    print("fastpatch self-check (paste all of this into a bug report)")
    for line in environment_lines():
        print(f"  {line}")
    found = devices()
    print("devices:")
    for device in found:
        print(f"  {_describe(device)}")

    failures = 0
    kernel_devices = []
    print("backend per op and device (fastpatch/backend.py):")
    for device in found:
        choices = {op: backend_choice(device, op) for op in OPS}
        backends = {backend for backend, _ in choices.values()}
        failures += "error" in backends
        if "triton" in backends:
            kernel_devices.append(device)
        for op, (backend, why) in choices.items():
            print(f"  {str(device):<8} {op:<21} {backend:<6} {why}")
    for line in _coverage_lines():
        print(f"  {line}")

    if not kernel_devices:
        print("kernel checks: none (no device runs the Triton kernels here)")
    for device in kernel_devices:
        print(f"kernel checks on {device} vs the float64 torch path (fp32 with TF32 off):")
        for result in kernel_checks(device):
            failures += not result.passed
            print(_result_line(result), flush=True)

    print(f"result: {'FAIL' if failures else 'PASS'}" + (f" ({failures} failed)" if failures else ""))
    return 1 if failures else 0

"""Shared numerics for tests and benchmarks: per-dtype tolerances and the error metric.

Every comparison in the test suite and every "max error" figure in the benchmarks uses
:func:`relative_error` against a float64 reference computed from the *same* (already rounded)
inputs, and checks it against :data:`TOLERANCES`. This module is the one place those numbers live.

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

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "Tolerance",
    "TOLERANCES",
    "relative_error",
    "assert_close_to_reference",
    "SHARED_MEMORY_LIMIT",
    "compile_for_gpu",
    "launch_specialization",
    "recorded_launches",
    "compile_summary",
    "resource_usage",
    "selected_compile_cases",
    "print_compile_results",
    "compile_results_in_subprocesses",
]


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


def compile_for_gpu(kernel, spec, capability: int, num_warps: int = 4, num_stages: int = 3):
    """Compile a ``@triton.jit`` kernel ahead of time for ``sm_<capability>`` without a GPU.

    Args:
        kernel: the jitted function.
        spec: a :class:`fastpatch.compat.LaunchSpecialization`: argument types, constexprs (the
            runtime's folded ``== 1`` integers included) and ``tt.divisibility = 16`` arguments, as
            :func:`launch_specialization` derives them from a real launch (see :func:`recorded_launches`).
        capability: 80 (A100) or 90 (H100).

    Returns:
        The compiled kernel; ``.asm`` holds ``"ttir"``, ``"ttgir"``, ``"ptx"`` (``wgmma`` marks Hopper
        tensor cores), ``.metadata.shared`` the shared memory in bytes.
    """
    from .compat import compile_for_target

    return compile_for_target(kernel, spec, capability, num_warps, num_stages)


def launch_specialization(kernel, args: Dict[str, object], capability: int):
    """The :class:`~fastpatch.compat.LaunchSpecialization` Triton's runtime derives from a launch's arguments."""
    from .compat import launch_specialization as specialize

    return specialize(kernel, args, capability)


@contextlib.contextmanager
def recorded_launches(kernels: Sequence[object]) -> Iterator[List[Tuple[object, Dict[str, object], Dict[str, object]]]]:
    """Inside the block, launches of ``kernels`` are recorded instead of run (no GPU or interpreter needed).

    Yields:
        A list that fills with ``(kernel, arguments by parameter name, launch options)`` per launch,
        e.g. ``options = {"num_warps": 4, "num_stages": 2}``. Call the real launchers with CPU
        tensors of the real layouts (``torch.empty`` touches no memory) to see what they pass.
    """
    launches: List[Tuple[object, Dict[str, object], Dict[str, object]]] = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            bound = dict(zip(kernel.arg_names, args))
            options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
            bound.update((k, v) for k, v in kwargs.items() if k in kernel.arg_names)
            launches.append((kernel, bound, options))
        return run

    for kernel in kernels:
        kernel.run = recorder(kernel)
    try:
        yield launches
    finally:
        for kernel in kernels:
            del kernel.run


#: Shared memory per block a launch configuration may use, by capability class: the sm_90 opt-in
#: maximum (227 KB); the "80" tables also serve sm_86/89 (99 KB), so they are held to that rather
#: than A100's 163 KB.
SHARED_MEMORY_LIMIT: Dict[int, int] = {80: 99 * 1024, 90: 227 * 1024}


def compile_summary(kernel, spec, capability: int, num_warps: int = 4, num_stages: int = 3) -> Dict[str, object]:
    """Compile with :func:`compile_for_gpu` and summarise what the tests check.

    Returns:
        ``{"wgmma": bool, "mma_sync": bool, "shared": bytes, "divisibility_hints": int,
        "vector_loads": int, "narrow_async_copies": int, "registers": int, "local_bytes": int,
        "stack": int}``: whether the PTX uses Hopper (``wgmma``)
        or Ampere (``mma.sync``) tensor-core instructions, the shared memory used, how many kernel
        arguments carry ``tt.divisibility = 16`` in the TTIR, how many 16-byte global loads the PTX
        has (``ld.global.v4`` and ``cp.async.cg``, which needs 16 bytes), how many ``cp.async``
        copy 4 or 8 bytes only, and :func:`resource_usage`'s registers, stack (register spills) and local bytes.
    """
    compiled = compile_for_gpu(kernel, spec, capability, num_warps=num_warps, num_stages=num_stages)
    ptx, ttir = compiled.asm["ptx"], compiled.asm["ttir"]
    signature = ttir[ttir.index("tt.func"):].split("\n", 1)[0]
    return {"wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx, "shared": compiled.metadata.shared,
            "divisibility_hints": signature.count("tt.divisibility = 16"),
            "vector_loads": len(re.findall(r"ld\.global[.\w]*\.v4\.|cp\.async\.cg\.", ptx)),
            "narrow_async_copies": len(re.findall(r"cp\.async\.ca\.shared\.global[^;]*, 0x[48],", ptx)),
            **resource_usage(compiled.asm["cubin"])}


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """``{"registers": per thread, "stack": stack-frame bytes per thread, "local_bytes": other local memory}``
    of a compiled kernel, read from its cubin by the ``cuobjdump`` bundled with Triton (no GPU needed).

    Triton kernels make no calls and keep no local arrays, so a stack frame holds register spills:
    ``stack > 0`` means the kernel spills (ptxas's "bytes spill stores").

    Raises:
        RuntimeError: no ``cuobjdump`` beside Triton's ``ptxas``, or output it cannot read.
    """
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        raise RuntimeError(f"no cuobjdump at {tool}: this triton does not bundle it")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        report = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=60)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", report.stdout)
    if report.returncode != 0 or found is None:
        raise RuntimeError(f"cuobjdump --dump-resource-usage gave no resource line: {report.stdout}{report.stderr}")
    registers, stack, local = map(int, found.groups())
    return {"registers": registers, "local_bytes": local, "stack": stack}


def selected_compile_cases(cases: Sequence[tuple]) -> List[tuple]:
    """The cases (tuples whose first item is the case id) that ``FASTPATCH_COMPILE_CASES`` selects.

    The variable is a regular expression searched in each case id (unset: every case); the
    oldest-triton CI run uses it to compile a subset. Raises ``ValueError`` when it selects nothing,
    so a typo cannot turn the compile tests into a silent no-op.
    """
    pattern = os.environ.get("FASTPATCH_COMPILE_CASES", "")
    selected = [case for case in cases if re.search(pattern, case[0])]
    if not selected:
        raise ValueError(f"FASTPATCH_COMPILE_CASES={pattern!r} selects none of {len(cases)} compile cases")
    return selected


def print_compile_results(cases: Sequence[Tuple[str, Callable[[], Dict[str, object]]]], argv: Sequence[str]) -> None:
    """Script side of :func:`compile_results_in_subprocesses`: compile this shard's cases, one JSON line each.

    ``argv`` is ``[shard, num_shards]``; case ``i`` belongs to shard ``i % num_shards``. A case that
    fails to compile is reported as ``{"error": "..."}`` (the test then fails on that case only).
    """
    shard, num_shards = (int(a) for a in argv) if argv else (0, 1)
    for case_id, compile_case in list(cases)[shard::num_shards]:
        try:
            result = compile_case()
        except Exception as exc:  # reported per case by the test
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps([case_id, result]), flush=True)


def compile_results_in_subprocesses(script: str, timeout: float, num_shards: Optional[int] = None) -> Dict[str, dict]:
    """Run ``script`` (a test file whose ``__main__`` calls :func:`print_compile_results`) in parallel shards.

    The test session runs with ``TRITON_INTERPRET=1``, under which ``@triton.jit`` functions cannot be
    compiled for a GPU, so the compiles happen in subprocesses without it, one per CPU core.

    Returns:
        case id -> the summary of :func:`compile_summary` (or ``{"error": ...}``).
    """
    num_shards = num_shards or max(1, os.cpu_count() or 1)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(shard: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script, str(shard), str(num_shards)], env=env, capture_output=True,
                              text=True, timeout=timeout)

    with ThreadPoolExecutor(num_shards) as pool:
        procs = list(pool.map(run, range(num_shards)))
    results = dict(json.loads(line) for proc in procs for line in proc.stdout.splitlines() if line.startswith("["))
    if not results:
        raise AssertionError("the compile subprocesses reported nothing:\n" + "\n".join(p.stderr[-3000:] for p in procs))
    return results

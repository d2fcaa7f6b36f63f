"""Ahead-of-time compile helpers of the tests and benchmarks (no GPU needed); not installed.

* :func:`recorded_launches`: call the real launchers on CPU tensors and record what they would launch;
* :func:`launch_specialization` / :func:`compile_for_gpu`: compile one launch for ``sm_<capability>``
  exactly as Triton's runtime specialises it (argument types, folded constants, divisibility hints;
  the version differences are in :mod:`fastpatch_dev.compat`);
* :func:`compile_summary` / :func:`resource_usage`: what the compile tests assert -- tensor-core
  instructions, shared memory, registers and spills (from ``cuobjdump``, bundled with Triton);
* :func:`compile_results_in_subprocesses` and friends: run a test file's compiles in parallel shards,
  outside the interpreter the test session runs under;
* :data:`SHARED_MEMORY_LIMIT`: each GPU class's shared memory per block
  (:data:`fastpatch.kernels.gpu_classes.GPU_CLASSES`).
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
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from fastpatch.kernels.gpu_classes import GPU_CLASSES

__all__ = [
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

#: The repository root (holds ``fastpatch_dev/``; the compile subprocesses get it on their path).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_for_gpu(kernel, spec, capability: int, num_warps: int = 4, num_stages: int = 3):
    """Compile a ``@triton.jit`` kernel ahead of time for ``sm_<capability>`` without a GPU.

    Args:
        kernel: the jitted function.
        spec: a :class:`fastpatch_dev.compat.LaunchSpecialization`: argument types, constexprs (the
            runtime's folded ``== 1`` integers included) and ``tt.divisibility = 16`` arguments, as
            :func:`launch_specialization` derives them from a real launch (see :func:`recorded_launches`).
        capability: 80 (A100), 86, 90 (H100), 100 (B200), 120 (RTX 50xx), ...

    Returns:
        The compiled kernel; ``.asm`` holds ``"ttir"``, ``"ttgir"``, ``"ptx"`` (``wgmma`` marks Hopper
        tensor cores), ``.metadata.shared`` the shared memory in bytes.
    """
    from .compat import compile_for_target

    return compile_for_target(kernel, spec, capability, num_warps, num_stages)


def launch_specialization(kernel, args: Dict[str, object], capability: int):
    """The :class:`~fastpatch_dev.compat.LaunchSpecialization` Triton's runtime derives from a launch's arguments."""
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


#: Shared memory per block a launch configuration may use, by GPU class (the opt-in maximum of the
#: class's GPUs: 163 KB on sm_80, 99 KB on sm_86/89 and sm_120, 227 KB on sm_90 and sm_100).
SHARED_MEMORY_LIMIT: Dict[int, int] = {key: gpu.shared_memory_per_block for key, gpu in GPU_CLASSES.items()}


def compile_summary(kernel, spec, capability: int, num_warps: int = 4, num_stages: int = 3) -> Dict[str, object]:
    """Compile with :func:`compile_for_gpu` and summarise what the tests check.

    Returns:
        ``{"wgmma": bool, "tcgen05": bool, "mma_sync": bool, "shared": bytes, "divisibility_hints": int,
        "vector_loads": int, "narrow_async_copies": int, "registers": int, "local_bytes": int,
        "stack": int}``: whether the PTX uses Hopper (``wgmma``), datacenter-Blackwell (``tcgen05.mma``)
        or Ampere (``mma.sync``) tensor-core instructions, the shared memory used, how many kernel
        arguments carry ``tt.divisibility = 16`` in the TTIR, how many 16-byte global loads the PTX
        has (``ld.global.v4`` and ``cp.async.cg``, which needs 16 bytes), how many ``cp.async``
        copy 4 or 8 bytes only, and :func:`resource_usage`'s registers, stack (register spills) and local bytes.
    """
    compiled = compile_for_gpu(kernel, spec, capability, num_warps=num_warps, num_stages=num_stages)
    ptx, ttir = compiled.asm["ptx"], compiled.asm["ttir"]
    signature = ttir[ttir.index("tt.func"):].split("\n", 1)[0]
    return {"wgmma": "wgmma" in ptx, "tcgen05": "tcgen05.mma" in ptx, "mma_sync": "mma.sync" in ptx, "shared": compiled.metadata.shared,
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
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)  # for fastpatch_dev

    def run(shard: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script, str(shard), str(num_shards)], env=env, capture_output=True,
                              text=True, timeout=timeout)

    with ThreadPoolExecutor(num_shards) as pool:
        procs = list(pool.map(run, range(num_shards)))
    results = dict(json.loads(line) for proc in procs for line in proc.stdout.splitlines() if line.startswith("["))
    if not results:
        raise AssertionError("the compile subprocesses reported nothing:\n" + "\n".join(p.stderr[-3000:] for p in procs))
    return results

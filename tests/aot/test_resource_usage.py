"""fastpatch_dev.aot.resource_usage: registers and register spills read from a cubin compiled on the CPU.

The compile tests assert that no kernel configuration spills (no stack frame); this checks the
reading itself on a kernel made to spill: a 128x128 fp32 tile held whole by one warp (512 values per
thread, over the 255-register limit) next to the same kernel on a 16x16 tile (8 values per thread).
Compiled for sm_80 in a subprocess without the interpreter (as the other compile tests).
"""
import functools
import os
import sys

import torch
import triton
import triton.language as tl

from fastpatch_dev.aot import (
    compile_for_gpu,
    compile_results_in_subprocesses,
    launch_specialization,
    print_compile_results,
    resource_usage,
)
if __name__ == "__main__":  # run as a script (the compile subprocesses): modes.py is in tests/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modes import cpu_ci_only  # noqa: E402


@triton.jit
def _row_scale_kernel(x_ptr, out_ptr, SIZE: tl.constexpr):
    """out = x * column sums of x: the whole tile stays live until its sums are known."""
    offsets = tl.arange(0, SIZE)[:, None] * SIZE + tl.arange(0, SIZE)[None, :]
    tile = tl.load(x_ptr + offsets)
    tl.store(out_ptr + offsets, tile * tl.sum(tile, axis=0)[None, :])


def _usage(size: int) -> dict:
    buffer = torch.empty(size * size, dtype=torch.float32)
    spec = launch_specialization(_row_scale_kernel, {"x_ptr": buffer, "out_ptr": buffer, "SIZE": size}, 80)
    return resource_usage(compile_for_gpu(_row_scale_kernel, spec, 80, num_warps=1, num_stages=1).asm["cubin"])


CASES = {"small": 16, "pressure": 128}


@cpu_ci_only
def test_resource_usage_sees_registers_and_spills():
    results = compile_results_in_subprocesses(__file__, timeout=300, num_shards=1)
    small, pressure = results["small"], results["pressure"]
    assert "error" not in small and "error" not in pressure, (small, pressure)
    assert 0 < small["registers"] < 64 and small["stack"] == small["local_bytes"] == 0, small
    assert pressure["stack"] >= 4 * (128 * 128 // 32 - 255), pressure  # 512 values per thread, 255 registers at most


if __name__ == "__main__":
    print_compile_results([(name, functools.partial(_usage, size)) for name, size in CASES.items()], sys.argv[1:])

"""Ahead-of-time compilation of the RoPE flash-attention kernels for sm_80 and sm_90 (no GPU needed).

Catches what the interpreter forgives (dtype mismatches in tl.dot, non-constexpr shapes, shared
memory overflow) and checks that Hopper code uses wgmma tensor cores for fp16/bf16. The test
session runs with ``TRITON_INTERPRET=1``, so the compiles run in subprocesses without it (this
file run as a script, see :func:`fastpatch.testing.compile_results_in_subprocesses`).

Every configuration the launchers can choose is compiled: head dim x dtype x capability x
(RoPE off / in-loop / pre-rotated) for the forward, dQ, dK/dV and rotation kernels, 180 kernels,
about 1 s each (a cold Triton cache; split over the CPU cores).
"""
import functools
import sys

import pytest
import torch

from fastpatch.kernels.rope_attention_configs import CAPABILITY_CLASSES, HEAD_DIMS
from fastpatch.launchers.rope_attention import kernel_specializations
from fastpatch.testing import (
    SHARED_MEMORY_LIMIT,
    compile_results_in_subprocesses,
    compile_summary,
    print_compile_results,
)
from modes import cpu_ci_only

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def signature(kernel, dtype: torch.dtype, launch: dict):
    """Triton signature and constexprs of ``kernel``: data pointers in ``dtype``, unit channel strides."""
    types, constexprs = {}, {}
    for name in kernel.arg_names:
        if name in launch:
            types[name], constexprs[name] = "constexpr", launch[name]
        elif name.endswith("pos_ptr"):
            types[name] = "*i64"
        elif name in ("freq_ptr", "lse_ptr", "delta_ptr"):
            types[name] = "*fp32"
        elif name.endswith("_ptr"):
            types[name] = "*" + TRITON_TYPES[dtype]
        elif name == "scale":
            types[name] = "fp32"
        elif name.startswith("stride_") and name.endswith("d"):
            types[name], constexprs[name] = "constexpr", 1  # channel stride: 1 in every real layout
        else:
            types[name] = "i32"
    return types, constexprs


def _rope_variant(launch: dict) -> str:
    if "ROPE" not in launch:
        return "rope_kernel"
    if not launch["ROPE"]:
        return "no_rope"
    return "in_loop" if launch.get("ROTATE_K_IN_LOOP", launch.get("ROTATE_Q_IN_LOOP")) else "pre_rotated"


def _cases():
    """(case id, kernel, launch keywords, dtype, capability) for every compile the tests check."""
    for capability in CAPABILITY_CLASSES:
        for head_dim in HEAD_DIMS:
            for dtype in TRITON_TYPES:
                for kernel, launch in kernel_specializations(head_dim, dtype, capability):
                    variant = _rope_variant(launch)
                    case = f"{kernel.__name__}-{variant}-d{head_dim}-{TRITON_TYPES[dtype]}-sm{capability}"
                    yield case, kernel, launch, dtype, capability


CASES = list(_cases())


def _compile(kernel, launch: dict, dtype: torch.dtype, capability: int) -> dict:
    launch = dict(launch)
    num_warps, num_stages = launch.pop("num_warps", 4), launch.pop("num_stages", 3)
    types, constexprs = signature(kernel, dtype, launch)
    return compile_summary(kernel, types, constexprs, capability, num_warps=num_warps, num_stages=num_stages)


@pytest.fixture(scope="module")
def compiled_cases():
    """case id -> compile result (or its error), from subprocesses without the interpreter."""
    return compile_results_in_subprocesses(__file__, timeout=1800)


@cpu_ci_only
@pytest.mark.parametrize("case, kernel, dtype, capability", [(c[0], c[1], c[3], c[4]) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_compiles_for_gpu(compiled_cases, case, kernel, dtype, capability):
    result = compiled_cases[case]
    assert "error" not in result, result.get("error")
    assert result["shared"] <= SHARED_MEMORY_LIMIT[capability], (
        f"{result['shared']} bytes of shared memory > {SHARED_MEMORY_LIMIT[capability]}")
    if kernel.__name__.startswith("rope_attention") and dtype != torch.float32:  # tensor cores
        assert result["wgmma"] if capability == 90 else result["mma_sync"]


if __name__ == "__main__":
    print_compile_results([(case_id, functools.partial(_compile, kernel, launch, dtype, capability))
                           for case_id, kernel, launch, dtype, capability in CASES], sys.argv[1:])

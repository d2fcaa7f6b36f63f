"""Ahead-of-time compilation of the RoPE flash-attention kernels for sm_80 and sm_90 (no GPU needed).

Catches what the interpreter forgives (dtype mismatches in tl.dot, non-constexpr shapes, shared
memory overflow) and checks that Hopper code uses wgmma tensor cores for fp16/bf16. The test
session runs with ``TRITON_INTERPRET=1``, under which ``@triton.jit`` functions cannot be compiled
for a GPU, so one subprocess without it (this file run as a script) compiles every case and
reports each result as a JSON line.

Each compile takes 1-8 s on a small CPU, so by default a representative subset runs: every
kernel x RoPE variant for (Dh 64, fp16, sm_90), and the largest tiles (Dh 128: bf16 on sm_90,
fp16 and fp32 on sm_80). ``FASTPATCH_COMPILE_ALL=1`` compiles every configuration the launchers
can choose (head dim x dtype x capability x RoPE off / in-loop / pre-rotated, 180 kernels).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastpatch.kernels.rope_attention_configs import CAPABILITY_CLASSES, HEAD_DIMS
from fastpatch.launchers.rope_attention import kernel_specializations
from fastpatch.testing import compile_for_gpu

#: Shared memory per block: sm_90 opt-in maximum 227 KB; the "80" table also serves sm_86/89
#: (99 KB), so it is held to that rather than A100's 163 KB.
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 99 * 1024}
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
COMPILE_ALL = os.environ.get("FASTPATCH_COMPILE_ALL", "0") == "1"


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


def _is_default(head_dim, dtype, capability, variant) -> bool:
    if (head_dim, dtype, capability) == (64, torch.float16, 90):
        return True
    largest = {(torch.bfloat16, 90), (torch.float16, 80), (torch.float32, 80)}
    return head_dim == 128 and (dtype, capability) in largest and variant == "in_loop"


def _cases():
    """(case id, kernel, launch keywords, dtype, capability) for every compile the tests check."""
    for capability in CAPABILITY_CLASSES:
        for head_dim in HEAD_DIMS:
            for dtype in TRITON_TYPES:
                for kernel, launch in kernel_specializations(head_dim, dtype, capability):
                    variant = _rope_variant(launch)
                    if COMPILE_ALL or _is_default(head_dim, dtype, capability, variant):
                        case = f"{kernel.__name__}-{variant}-d{head_dim}-{TRITON_TYPES[dtype]}-sm{capability}"
                        yield case, kernel, launch, dtype, capability


CASES = list(_cases())


def _compile(kernel, launch: dict, dtype: torch.dtype, capability: int) -> dict:
    launch = dict(launch)
    num_warps, num_stages = launch.pop("num_warps", 4), launch.pop("num_stages", 3)
    types, constexprs = signature(kernel, dtype, launch)
    compiled = compile_for_gpu(kernel, types, constexprs, capability, num_warps=num_warps, num_stages=num_stages)
    ptx = compiled.asm["ptx"]
    return {"wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx, "shared": compiled.metadata.shared}


@pytest.fixture(scope="module")
def compiled_cases():
    """case id -> compile result (or its error), from one subprocess without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1800)
    results = dict(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("["))
    if not results:
        pytest.fail(f"the compile subprocess reported nothing:\n{proc.stderr[-4000:]}")
    return results


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
    for case_id, case_kernel, case_launch, case_dtype, case_capability in CASES:
        try:
            case_result = _compile(case_kernel, case_launch, case_dtype, case_capability)
        except Exception as exc:  # reported per case by the test
            case_result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps([case_id, case_result]), flush=True)

"""Ahead-of-time compilation of the qk-norm + RoPE2D attention kernels for sm_80 and sm_90 (no GPU).

Every (kernel, constexprs) :func:`kernel_specializations` lists -- pre-pass and LN backward (grid /
tensor positions, both numerics), the forward, and the RoPE-off backward kernels with the fp32
dQ'/dK' buffers these launchers give them -- in fp16, bf16 and fp32 (IEEE and TF32), head dim 64,
compiled with ``triton.compile`` in a subprocess without ``TRITON_INTERPRET`` (this file run as a
script). ``FASTPATCH_QKNORM_COMPILE_ALL=1`` compiles all 84 cases (about 3 minutes on 2 busy cores);
by default :func:`_selected` keeps every bf16 kernel with grid positions, the fp16 forward on sm_90 and
the IEEE fp32 forward on sm_80 (all 84 compiled on 2026-12-02, triton 3.7.1: no errors, wgmma in every
half-precision attention kernel on sm_90). Checks: it compiles, shared memory fits the class, half-precision attention kernels use
tensor cores (``wgmma`` on sm_90, ``mma.sync`` on sm_80).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

if __name__ == "__main__":  # run as a script (the compile subprocesses): modes.py is in tests/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modes import cpu_ci_only  # noqa: E402

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_FP32_POINTERS = {"freq_ptr", "lse_ptr", "delta_ptr", "grad_w_ptr", "grad_b_ptr", "q_w_ptr", "q_b_ptr", "w_ptr",
                  "b_ptr", "grad_ptr"}


def _signature(kernel, constexprs, dtype_name):
    """Triton signature of one launch: tokens in ``dtype_name``; fp32 statistics, parameters, dQ'/dK'."""
    from fastpatch.kernels.rope_attention_bwd import rope_attention_bwd_dkdv_kernel, rope_attention_bwd_dq_kernel
    fp32_grads = {"grad_q_ptr", "grad_k_ptr"} if kernel in (rope_attention_bwd_dq_kernel,
                                                           rope_attention_bwd_dkdv_kernel) else set()
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            if "pos" in name:
                signature[name] = "*i64"
            elif name in _FP32_POINTERS or name in fp32_grads:
                signature[name] = "*fp32"
            else:
                signature[name] = f"*{dtype_name}"
        elif name in ("scale", "eps"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _cases():
    from fastpatch.kernels.rope_attention_bwd import rope_attention_bwd_dkdv_kernel, rope_attention_bwd_dq_kernel
    from fastpatch.kernels.qknorm_rope_attention_configs import dot_precisions, qknorm_rope_attention_config
    from fastpatch.launchers.qknorm_rope_attention import kernel_specializations

    for capability in (80, 90):
        for dtype, name in TYPES.items():
            items = list(kernel_specializations(64, dtype, capability))
            for precision in dot_precisions(dtype):
                config = qknorm_rope_attention_config(64, dtype, (capability // 10, 0), precision)
                for kernel, cfg, flag in ((rope_attention_bwd_dq_kernel, config.backward_dq, "ROTATE_K_IN_LOOP"),
                                          (rope_attention_bwd_dkdv_kernel, config.backward_dkdv, "ROTATE_Q_IN_LOOP")):
                    items.append((kernel, dict(HEAD_DIM=64, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ROPE=False,
                                               UPCAST_BF16=False, DOT_PRECISION=precision, num_warps=cfg.num_warps,
                                               num_stages=cfg.num_stages, **{flag: False})))
            for kernel, launch in items:
                tag = "-".join(f"{k}{v}" for k, v in sorted(launch.items()) if k in ("GRID", "STORAGE_ROPE",
                                                                                      "DOT_PRECISION"))
                yield f"{kernel.__name__}-{tag}-{name}-sm{capability}", kernel, launch, name, capability


FULL = os.environ.get("FASTPATCH_QKNORM_COMPILE_ALL", "0") == "1"


def _selected(case: str) -> bool:
    if FULL:
        return True
    if "-bf16-" in case:
        return "GRIDFalse" not in case
    return (case.startswith("qknorm_rope_attention_fwd_kernel") and "GRIDTrue-STORAGE_ROPEFalse" in case
            and (case.endswith("fp16-sm90") or case.endswith("ieee-GRIDTrue-STORAGE_ROPEFalse-fp32-sm80")))


def _compile_all() -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for case, kernel, launch, dtype_name, capability in _cases():
        if not _selected(case):
            continue
        constexprs = {k: v for k, v in launch.items() if k not in ("num_warps", "num_stages")}
        try:
            source = ASTSource(fn=kernel, signature=_signature(kernel, constexprs, dtype_name), constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                      options={"num_warps": launch.get("num_warps", 4),
                                               "num_stages": launch.get("num_stages", 3)})
            ptx = compiled.asm["ptx"]
            results[case] = {"shared": compiled.metadata.shared, "wgmma": "wgmma.mma_async" in ptx,
                             "mma_sync": "mma.sync" in ptx}
        except Exception as error:  # noqa: BLE001 - reported per case
            results[case] = {"error": f"{type(error).__name__}: {error}"}
    return results


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@cpu_ci_only
def test_every_kernel_configuration_compiles_for_sm80_and_sm90(compiled):
    failures = {case: r["error"] for case, r in compiled.items() if "error" in r}
    assert not failures, failures
    assert len(compiled) >= 2 * 7 + 2  # bf16: 7 kernel variants per class; fp16 and fp32 forwards
    for case, result in compiled.items():
        capability = int(case.rsplit("sm", 1)[1])
        assert result["shared"] <= SHARED_LIMIT[capability], case
        attention = "attention" in case
        if attention and "-fp32-" not in case:  # half precision: tensor cores
            assert result["wgmma"] if capability == 90 else result["mma_sync"], case


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(_compile_all()))

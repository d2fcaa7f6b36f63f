"""Ahead-of-time compilation of the qk-norm + RoPE2D attention kernels for every GPU class (no GPU).

Every (kernel, constexprs) :func:`kernel_specializations` lists -- pre-pass and LN backward (grid /
tensor positions, both numerics), the forward, and the RoPE-off backward kernels with the fp32
dQ'/dK' buffers these launchers give them -- in fp16, bf16 and fp32 (IEEE and TF32), head dim 64,
for each class of :data:`fastpatch.kernels.gpu_classes.GPU_CLASSES`, compiled with ``triton.compile``
in a subprocess without ``TRITON_INTERPRET`` (this file run as a script).
``FASTPATCH_QKNORM_COMPILE_ALL=1`` compiles every case; by default :func:`_selected` keeps, on sm_80
and sm_90, every bf16 kernel with grid positions, the fp16 forward on sm_90 and the IEEE fp32 forward
on sm_80 (all sm_80/sm_90 cases compiled on 2026-12-02, triton 3.7.1: no errors, wgmma in every
half-precision attention kernel on sm_90), and on sm_86, sm_100 and sm_120 the bf16 attention kernels
(forward with grid positions and fp32 numerics, both backward kernels). Checks, per class: it
compiles, shared memory fits the class's per-block limit, half-precision attention kernels use the
class's tensor cores (``mma.sync``; ``wgmma`` on sm_90; ``tcgen05`` on sm_100) and no class but
sm_90 gets ``wgmma``.
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
#: Classes that compile every selected variant; the others compile the bf16 attention kernels only.
EVERY_VARIANT_CLASSES = (80, 90)
#: Tensor-core instruction -> the compile summary's field.
TENSOR_CORE_FIELDS = {"mma.sync": "mma_sync", "wgmma": "wgmma", "tcgen05": "tcgen05"}
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

    from fastpatch.kernels.gpu_classes import GPU_CLASSES

    for capability, gpu in GPU_CLASSES.items():
        for dtype, name in TYPES.items():
            items = list(kernel_specializations(64, dtype, capability))
            for precision in dot_precisions(dtype):
                config = qknorm_rope_attention_config(64, dtype, gpu.capability, precision)
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
    if int(case.rsplit("sm", 1)[1]) not in EVERY_VARIANT_CLASSES:
        return "-bf16-" in case and (case.startswith("rope_attention_bwd") or (
            case.startswith("qknorm_rope_attention_fwd_kernel") and "GRIDTrue-STORAGE_ROPEFalse" in case))
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
                             "mma_sync": "mma.sync" in ptx, "tcgen05": "tcgen05.mma" in ptx}
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
def test_every_kernel_configuration_compiles_for_every_gpu_class(compiled):
    from fastpatch.kernels.gpu_classes import GPU_CLASSES

    failures = {case: r["error"] for case, r in compiled.items() if "error" in r}
    assert not failures, failures
    per_class = {capability: [case for case in compiled if case.endswith(f"-sm{capability}")]
                 for capability in GPU_CLASSES}
    assert all(len(per_class[c]) >= 7 for c in EVERY_VARIANT_CLASSES), per_class  # bf16: 7 kernel variants
    assert all(len(cases) >= 3 for c, cases in per_class.items() if c not in EVERY_VARIANT_CLASSES), per_class
    for case, result in compiled.items():
        gpu = GPU_CLASSES[int(case.rsplit("sm", 1)[1])]
        assert result["shared"] <= gpu.shared_memory_per_block, case
        if "attention" in case and "-fp32-" not in case:  # half precision: the class's tensor cores
            assert result[TENSOR_CORE_FIELDS[gpu.tensor_cores]], (case, gpu.tensor_cores)
        if not gpu.wgmma:
            assert not result["wgmma"], case


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(_compile_all()))

"""Ahead-of-time compilation of the RoPE flash-attention kernels for every GPU class (no GPU needed).

Catches what the interpreter forgives (dtype mismatches in tl.dot, non-constexpr shapes, shared
memory overflow) and checks, per GPU class (:data:`~fastpatch.kernels.gpu_classes.GPU_CLASSES`:
sm_80, sm_86, sm_90, sm_100, sm_120): shared memory within the class's per-block limit, the class's
tensor cores for fp16/bf16 (mma.sync; wgmma on sm_90 only; tcgen05 on sm_100) and no wgmma anywhere
else, and no register spills where the Hopper rows have none. The test session runs with
``TRITON_INTERPRET=1``, so the compiles run in subprocesses without it (this file run as a script,
see :func:`fastpatch_dev.aot.compile_results_in_subprocesses`).

Every kernel configuration the launchers can choose (:func:`kernel_specializations`: head dim x
dtype x class x RoPE off / in-loop / pre-rotated, forward, dQ, dK/dV and rotation kernels) is
compiled the way Triton's runtime specialises it for real calls: the launchers are called on CPU
with the layouts the attention modules produce (q/k/v strided views of the fused qkv projection,
or of the three cross-attention projections; ``torch.empty``, nothing computed), their launches are
recorded, and :func:`fastpatch_dev.compat.launch_specialization` derives the argument types, the
integers folded to constants (unit strides) and the ``tt.divisibility = 16`` hints from them.

On sm_80 and sm_90 (:data:`EVERY_VARIANT_CLASSES`), head dim 64 (every DUSt3R / MASt3R / CroCo
model) is compiled for each distinct specialisation of the real shapes in :data:`SHAPES`, head
dims 32 and 128 for the first shape only, each in every RoPE variant. The other classes compile
every row of their table once, at the first shape, to keep the suite's time: in every RoPE variant
at head dim 64 in fp16/bf16 (where no spill is allowed), in-loop RoPE (the largest shared memory)
elsewhere.
"""
import functools
import os
import sys

import pytest
import torch

from fastpatch.kernels.gpu_classes import GPU_CLASSES
from fastpatch.kernels.rope_attention_configs import HEAD_DIMS
from fastpatch.launchers.rope_attention import (
    kernel_specializations,
    rope_attention_backward,
    rope_attention_forward,
)
from fastpatch_dev.aot import (
    SHARED_MEMORY_LIMIT,
    compile_results_in_subprocesses,
    compile_summary,
    launch_specialization,
    print_compile_results,
    recorded_launches,
    selected_compile_cases,
)
from fastpatch_dev.compat import LaunchSpecialization
if __name__ == "__main__":  # run as a script (the compile subprocesses): modes.py is in tests/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modes import cpu_ci_only  # noqa: E402

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
DUST3R_HEAD_DIM = 64

#: Attention calls of the DUSt3R family: (self | cross, batch, tokens, channels); heads = channels // Dh.
#: The ViT-L encoder (1024 channels, 16 heads) at 512x384 inputs (768 tokens) and the ViT-B decoder
#: (768 channels, 12 heads) at 224x224 (196 tokens). The other two real pairings (768 tokens with 12
#: heads, 196 with 16) specialise differently only in ``num_heads``, which compiled to identical PTX
#: and shared memory for every head-dim-64 kernel at sm_90 (triton 3.7.1, 2026-11-26), so they are left
#: out to keep the suite's time; 768 vs 196 tokens do change the code.
SHAPES = {
    "enc-b8-n768": ("self", 8, 768, 1024),
    "dec-b1-n196": ("self", 1, 196, 768),
    "xdec-b1-n196": ("cross", 1, 196, 768),
}


def _rope_variant(launch: dict) -> str:
    if "ROPE" not in launch:
        return "rope_kernel"
    if not launch["ROPE"]:
        return "no_rope"
    return "in_loop" if launch.get("ROTATE_K_IN_LOOP", launch.get("ROTATE_Q_IN_LOOP")) else "pre_rotated"


#: GPU classes compiled in every RoPE variant at every distinct real-shape specialisation (module docstring).
EVERY_VARIANT_CLASSES = (80, 90)
#: Tensor-core instruction -> the compile summary's field.
TENSOR_CORE_FIELDS = {"mma.sync": "mma_sync", "wgmma": "wgmma", "tcgen05": "tcgen05"}
#: (class, kernel) whose head-dim-64 fp16/bf16 row spills: sm_80's dK/dV (200 B per thread at 255 registers;
#: kernels/rope_attention_configs.py), kept until an A100 times the alternatives.
KNOWN_SPILLS = {(80, "rope_attention_bwd_dkdv_kernel")}


def _compiled_here(capability: int, head_dim: int, dtype: torch.dtype, variant: str) -> bool:
    """Whether this class compiles this RoPE variant (every one on :data:`EVERY_VARIANT_CLASSES`)."""
    if capability in EVERY_VARIANT_CLASSES or variant in ("in_loop", "rope_kernel"):
        return True
    return head_dim == DUST3R_HEAD_DIM and dtype != torch.float32


def _cases():
    """(case id, kernel, launch keywords, dtype, capability) for every configuration the launchers choose."""
    for capability in GPU_CLASSES:
        for head_dim in HEAD_DIMS:
            for dtype in TRITON_TYPES:
                for kernel, launch in kernel_specializations(head_dim, dtype, capability):
                    variant = _rope_variant(launch)
                    if not _compiled_here(capability, head_dim, dtype, variant):
                        continue
                    extra = "".join(f"-{v}" for k, v in sorted(launch.items()) if isinstance(v, str))  # e.g. tf32
                    case = f"{kernel.__name__}-{variant}{extra}-d{head_dim}-{TRITON_TYPES[dtype]}-sm{capability}"
                    yield case, kernel, launch, dtype, capability


ALL_CASES = list(_cases())
CASES = selected_compile_cases(ALL_CASES)
KERNELS = list({kernel: None for _, kernel, _, _, _ in ALL_CASES})


#: The Hopper fp16 forward: also compiled once more without the runtime's hints (what these tests compiled before).
HOPPER_FP16_FORWARD = next(c[0] for c in ALL_CASES if c[0].startswith("rope_attention_fwd_kernel-in_loop")
                           and "-d64-fp16-sm90" in c[0])
UNHINTED = "unhinted-" + HOPPER_FP16_FORWARD
SELECTED_IDS = {c[0] for c in CASES}


def _selected_result(compiled_cases: dict, case: str) -> dict:
    if case not in SELECTED_IDS:
        pytest.skip(f"{case} is not selected by FASTPATCH_COMPILE_CASES")
    assert "error" not in compiled_cases[case], compiled_cases[case]["error"]
    return compiled_cases[case]


def _attention_inputs(shape: str, head_dim: int, dtype: torch.dtype):
    """q, k, v (B, H, N, Dh) and positions (B, N, 2) laid out as the modules lay them out."""
    kind, batch, tokens, channels = SHAPES[shape]
    heads = channels // head_dim
    if kind == "self":  # Attention: unbind of the (B, N, 3, H, Dh) qkv projection, heads transposed
        qkv = torch.empty(batch, tokens, 3, heads, head_dim, dtype=dtype)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    else:  # CrossAttention: three (B, N, C) projections unflattened into heads
        q, k, v = (torch.empty(batch, tokens, heads, head_dim, dtype=dtype).transpose(1, 2) for _ in range(3))
    q_pos, k_pos = (torch.empty(batch, tokens, 2, dtype=torch.int64) for _ in range(2))
    return q, k, v, q_pos, k_pos


@functools.lru_cache(maxsize=None)
def _recorded(shape: str, head_dim: int, dtype: torch.dtype, variant: str):
    """The launches of one forward + backward through the real launchers, recorded (nothing runs)."""
    q, k, v, q_pos, k_pos = _attention_inputs(shape, head_dim, dtype)
    rope_base = None if variant == "no_rope" else 100.0
    k_rotation = "in_loop" if variant == "in_loop" else "pre_rotated"
    scale = head_dim ** -0.5
    with recorded_launches(KERNELS) as launches:
        out, lse = rope_attention_forward(q, k, v, q_pos, k_pos, rope_base, 1.0, scale, k_rotation)
        # What the output projection's backward hands back: a contiguous (B, N, C) gradient, split into heads.
        grad_out = torch.empty_like(out)
        rope_attention_backward(grad_out, q, k, v, out, lse, q_pos, k_pos, rope_base, 1.0, scale, k_rotation)
    return launches


def _specializations(kernel, launch: dict, dtype: torch.dtype, capability: int):
    """{specialisation key: (first shape giving it, spec)} of ``kernel`` under ``launch`` over the real shapes."""
    head_dim = launch["HEAD_DIM"]
    constexprs = {k: v for k, v in launch.items() if k not in ("num_warps", "num_stages")}
    every_shape = head_dim == DUST3R_HEAD_DIM and capability in EVERY_VARIANT_CLASSES
    shapes = list(SHAPES) if every_shape else list(SHAPES)[:1]
    found = {}
    for shape in shapes:
        for recorded_kernel, args, _ in _recorded(shape, head_dim, dtype, _rope_variant(launch)):
            if recorded_kernel is kernel:
                spec = launch_specialization(kernel, {**args, **constexprs}, capability)
                found.setdefault(spec.key(), (shape, spec))
    if not found:
        raise AssertionError(f"the launchers never launched {kernel.__name__} with {launch}")
    return list(found.values())


def _compile(kernel, launch: dict, dtype: torch.dtype, capability: int) -> dict:
    """Compile every distinct real-shape specialisation; one summary per specialisation."""
    results = []
    for shape, spec in _specializations(kernel, launch, dtype, capability):
        summary = compile_summary(kernel, spec, capability, num_warps=launch.get("num_warps", 4),
                                  num_stages=launch.get("num_stages", 3))
        results.append({"shape": shape, "divisible": list(spec.divisible_by_16), **summary})
    return {"specializations": results}


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
    gpu = GPU_CLASSES[capability]
    for spec in result["specializations"]:
        where = f"specialised for {spec['shape']}"
        assert spec["shared"] <= SHARED_MEMORY_LIMIT[capability], (
            f"{where}: {spec['shared']} bytes of shared memory > {SHARED_MEMORY_LIMIT[capability]}")
        if kernel.__name__.startswith("rope_attention") and dtype != torch.float32:  # tensor cores
            assert spec[TENSOR_CORE_FIELDS[gpu.tensor_cores]], f"{where}: no {gpu.tensor_cores} in the PTX"
        if not gpu.wgmma:
            assert not spec["wgmma"], f"{where}: wgmma in PTX for sm_{capability}, which has none"
        if dtype == torch.float32 and _dot_precision(case) == "ieee":  # IEEE fp32: no tensor cores on any class
            assert not [field for field in TENSOR_CORE_FIELDS.values() if spec[field]], where
        # The runtime's hints reached the compiler: every data pointer is 16-byte aligned in these layouts.
        pointers = [name for name in kernel.arg_names if name.endswith("_ptr")]
        assert set(pointers) <= set(spec["divisible"]), where
        assert spec["divisibility_hints"] == len(spec["divisible"]), where
        assert spec["vector_loads"] > 0, f"{where}: no 16-byte global loads in the PTX"
        if _must_not_spill(kernel, dtype, capability, case):
            assert spec["stack"] == spec["local_bytes"] == 0, (
                f"{where}: {spec['stack']} stack bytes per thread (register spills) at {spec['registers']} registers")


def _dot_precision(case: str) -> str:
    """The dot precision of a case id ("-tf32-" marks TF32 launches; the RoPE kernel has no dot)."""
    return "tf32" if "-tf32-" in case else "none" if case.startswith("rope_rotate_kernel") else "ieee"


def _must_not_spill(kernel, dtype: torch.dtype, capability: int, case: str) -> bool:
    """What the Hopper rows compile without register spills -- DUSt3R's attention, head dim 64, fp16/bf16,
    every kernel and RoPE variant -- is held to no spills on every GPU class (but :data:`KNOWN_SPILLS`), and
    the RoPE kernel everywhere. Other configurations do spill (triton 3.7.1; the
    ``kernels/rope_attention_configs.py`` docstring lists them with the static sweep's evidence) and
    wait for GPU tuning."""
    if kernel.__name__ == "rope_rotate_kernel":
        return True
    if (capability, kernel.__name__) in KNOWN_SPILLS:
        return False
    return dtype != torch.float32 and f"-d{DUST3R_HEAD_DIM}-" in case


def test_the_no_spill_rule_covers_dust3r_on_hopper():
    """Every head-dim-64 half-precision Hopper case (2 dtypes x (3 kernels x 3 RoPE variants + the RoPE kernel))
    is held to no spills: the rule cannot quietly select nothing."""
    held = [case for case, kernel, _, dtype, capability in ALL_CASES if _must_not_spill(kernel, dtype, capability, case)]
    dust3r_hopper = [c for c in ALL_CASES if c[4] == 90 and c[3] != torch.float32 and "-d64-" in c[0]]
    assert len(dust3r_hopper) == 2 * (3 * 3 + 1) and set(c[0] for c in dust3r_hopper) <= set(held)


@pytest.mark.parametrize("capability", [c for c in GPU_CLASSES if c != 90])
def test_the_no_spill_rule_covers_dust3r_on_every_class(capability):
    """Every GPU class compiles the same head-dim-64 half-precision cases as Hopper (every kernel and RoPE
    variant), each held to no spills but for :data:`KNOWN_SPILLS`."""
    dust3r = [c for c in ALL_CASES if c[4] == capability and c[3] != torch.float32 and "-d64-" in c[0]]
    assert len(dust3r) == 2 * (3 * 3 + 1)
    exempt = [c[0] for c in dust3r if (capability, c[1].__name__) in KNOWN_SPILLS]
    held = {c[0] for c in dust3r if _must_not_spill(c[1], c[3], capability, c[0])}
    assert held == {c[0] for c in dust3r} - set(exempt) and len(exempt) <= 2 * 3


@cpu_ci_only
def test_head_dim_64_covers_every_distinct_real_shape_specialisation(compiled_cases):
    """768 tokens / 16 heads and 196 tokens / 12 heads differ in divisibility: both are compiled, none twice."""
    found = _selected_result(compiled_cases, HOPPER_FP16_FORWARD)["specializations"]
    divisible = [set(spec["divisible"]) for spec in found]
    assert len(divisible) == len({frozenset(d) for d in divisible}) == 2
    assert any({"seq_q", "num_heads"} <= d for d in divisible)  # 768 tokens, 16 heads
    assert any(not {"seq_q", "num_heads"} & d for d in divisible)  # 196 tokens, 12 heads


def _compile_unhinted() -> dict:
    _, kernel, launch, dtype, capability = next(c for c in CASES if c[0] == HOPPER_FP16_FORWARD)
    _, spec = _specializations(kernel, launch, dtype, capability)[0]
    bare = LaunchSpecialization(spec.types, spec.constexprs, divisible_by_16=())
    return compile_summary(kernel, bare, capability, num_warps=launch["num_warps"], num_stages=launch["num_stages"])


@cpu_ci_only
def test_runtime_hints_change_the_compiled_kernel(compiled_cases):
    """Without the divisibility hints the same kernel has no 16-byte loads and another shared-memory size:
    compiling unspecialised checks a variant that never runs."""
    hinted = _selected_result(compiled_cases, HOPPER_FP16_FORWARD)["specializations"][0]
    unhinted = compiled_cases[UNHINTED]
    assert "error" not in unhinted, unhinted["error"]
    assert hinted["vector_loads"] > 0 and unhinted["vector_loads"] == 0
    assert hinted["divisibility_hints"] > 0 and unhinted["divisibility_hints"] == 0
    assert hinted["shared"] != unhinted["shared"]


if __name__ == "__main__":
    print_compile_results([(case_id, functools.partial(_compile, kernel, launch, dtype, capability))
                           for case_id, kernel, launch, dtype, capability in CASES]
                          + [(UNHINTED, _compile_unhinted)] * (HOPPER_FP16_FORWARD in SELECTED_IDS), sys.argv[1:])

"""Patch embedding under compilers.

* Every kernel, in every dtype and launch configuration :func:`patch_embed_config` can choose,
  compiled ahead of time for every GPU class (sm_80, sm_86, sm_90, sm_100, sm_120; catches what the
  interpreter forgives), in subprocesses without the interpreter (this file run as a script, see
  :func:`fastpatch_dev.aot.compile_results_in_subprocesses`). Each is specialised as Triton's
  runtime specialises it: the real launchers are called on CPU with DUSt3R's inputs (NCHW
  float images of 224x224 and 512x384, batch 1 and 8; ``torch.empty``, nothing computed), their
  launches recorded, and every distinct specialisation (unit strides folded to constants,
  ``tt.divisibility = 16`` on 16-divisible pointers and integers) is compiled -- on sm_80 and sm_90;
  the other classes compile the batch of 8 at 512x384 only, to keep the suite's time. Checked per
  class: shared memory within its per-block limit, its tensor cores for fp16/bf16 (wgmma on sm_90
  only, tcgen05 on sm_100, mma.sync elsewhere) and no wgmma off Hopper, and no register spills in
  the forward (as on Hopper).
* The ``fastpatch::`` custom ops pass ``torch.library.opcheck`` and trace under ``torch.compile``
  with ``fullgraph=True`` (no graph breaks), on the ``device`` fixture (interpreter on CPU, or
  compiled kernels on CUDA).
"""
import functools
import os
import sys

import pytest
import torch

import fastpatch
from fastpatch.kernels.gpu_classes import GPU_CLASSES
from fastpatch.kernels.patch_embed import (
    patch_embed_fwd_kernel,
    patch_embed_grad_image_kernel,
    patch_embed_grad_weight_kernel,
)
from fastpatch.kernels.patch_embed_configs import PATCH_EMBED_CONFIGS
from fastpatch.launchers.patch_embed import patch_embed_forward, patch_embed_grad_image, patch_embed_grad_params
from fastpatch.ops import patch_embed_triton  # noqa: F401  (registers the fastpatch:: ops)
from fastpatch_dev.aot import (
    SHARED_MEMORY_LIMIT,
    compile_results_in_subprocesses,
    compile_summary,
    launch_specialization,
    print_compile_results,
    recorded_launches,
    selected_compile_cases,
)
if __name__ == "__main__":  # run as a script (the compile subprocesses): modes.py is in tests/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modes import cpu_ci_only  # noqa: E402

KERNELS = [patch_embed_fwd_kernel, patch_embed_grad_weight_kernel, patch_embed_grad_image_kernel]
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
PATCH = 16
#: DUSt3R inputs (batch, height, width): 224x224 (196 tokens) and 512x384 landscape storage (768 tokens).
IMAGES = [(1, 224, 224), (8, 224, 224), (1, 384, 512), (8, 384, 512)]
#: ViT-L's embedding width for the wide configs; the narrow ones (embed_dim <= 64) serve no DUSt3R
#: model and are compiled for 64 channels.
EMBED_DIMS = {True: 1024, False: 64}
#: GPU classes compiled at every distinct image specialisation (module docstring).
EVERY_IMAGE_CLASSES = (80, 90)
#: Tensor-core instruction -> the compile summary's field.
TENSOR_CORE_FIELDS = {"mma.sync": "mma_sync", "wgmma": "wgmma", "tcgen05": "tcgen05"}
#: (class, kernel) whose IEEE fp32 product triton 3.7.1 compiles to ``tcgen05.mma.kind::tf32`` anyway: TF32 math
#: where IEEE fp32 was asked for (docs/gpu-classes.md, open). The grad-weight kernel's transposed operands are then
#: copied 4 bytes at a time (no 16-byte global load).
IEEE_ON_TENSOR_CORES = {(100, "patch_embed_fwd_kernel"), (100, "patch_embed_grad_weight_kernel")}


def _launchable():
    """(capability, dtype, config, wide) for every distinct config the table holds, each dtype it serves."""
    seen = set()
    for (capability, dtype, wide), config in PATCH_EMBED_CONFIGS.items():
        if (capability, dtype, config) not in seen:
            seen.add((capability, dtype, config))
            yield capability, dtype, config, wide


def _compile_cases():
    """(case id, kernel, capability, dtype, config, options) for every compile the tests check."""
    for kernel in KERNELS:
        for capability, dtype, config, wide in _launchable():
            case = f"{kernel.__name__}-sm{capability}-{TRITON_DTYPES[dtype]}-{'x'.join(map(str, config))}"
            yield case, kernel, capability, dtype, config, dict(wide=wide)
        for capability in GPU_CLASSES:
            # The other constexpr paths: PatchEmbedDust3R (no ManyAR flags) with TF32 fp32 products.
            config = max(c for (cap, dtype, _), c in PATCH_EMBED_CONFIGS.items()
                         if cap == capability and dtype == torch.float32)
            options = dict(wide=True, many_ar=False, precision="tf32")
            yield f"{kernel.__name__}-sm{capability}-fp32-plain-tf32", kernel, capability, torch.float32, config, options


COMPILE_CASES = selected_compile_cases(list(_compile_cases()))


@functools.lru_cache(maxsize=None)
def _recorded(image: tuple, embed_dim: int, dtype: torch.dtype, many_ar: bool):
    """The launches of one forward + both backward launchers, recorded (nothing runs)."""
    batch, height, width = image
    img = torch.empty(batch, 3, height, width, dtype=dtype)
    weight = torch.empty(embed_dim, 3, PATCH, PATCH, dtype=dtype)
    bias = torch.empty(embed_dim, dtype=dtype)
    portrait = torch.empty(batch, dtype=torch.bool) if many_ar else None
    with recorded_launches(KERNELS) as launches:
        tokens, _ = patch_embed_forward(img, weight, bias, PATCH, portrait)
        grad_tokens = torch.empty_like(tokens)  # (B, N, E) contiguous, as the first block's backward gives it
        patch_embed_grad_params(grad_tokens, img, weight, PATCH, portrait)
        patch_embed_grad_image(grad_tokens, img, weight, PATCH, portrait)
    return launches


def _specializations(kernel, capability, dtype, config, wide=True, many_ar=True, precision="ieee"):
    """[(image, spec)] for each distinct specialisation of ``kernel`` over :data:`IMAGES`."""
    constexprs = dict(PATCH=PATCH, MANY_AR=many_ar, UPCAST=False, DOT_PRECISION=precision,
                      BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    found = {}
    for image in IMAGES if capability in EVERY_IMAGE_CLASSES else IMAGES[-1:]:
        for recorded_kernel, args, _ in _recorded(image, EMBED_DIMS[wide], dtype, many_ar):
            if recorded_kernel is kernel:
                spec = launch_specialization(kernel, {**args, **constexprs}, capability)
                found.setdefault(spec.key(), ("x".join(map(str, image)), spec))
    return list(found.values())


def _compile(kernel, capability, dtype, config, **options):
    results = []
    for image, spec in _specializations(kernel, capability, dtype, config, **options):
        summary = compile_summary(kernel, spec, capability, num_warps=config.num_warps, num_stages=config.num_stages)
        results.append({"image": image, "divisible": list(spec.divisible_by_16), **summary})
    return {"specializations": results}


@pytest.fixture(scope="module")
def compiled_cases():
    """case id -> compile result (or its error), from subprocesses without the interpreter."""
    return compile_results_in_subprocesses(__file__, timeout=600)


@cpu_ci_only
@pytest.mark.parametrize("case,capability,dtype,options", [c[:1] + c[2:4] + c[5:] for c in COMPILE_CASES],
                         ids=[c[0] for c in COMPILE_CASES])
def test_compiles_for_gpu(compiled_cases, case, capability, dtype, options):
    result = compiled_cases[case]
    assert "error" not in result, result.get("error")
    assert result["specializations"]
    gpu = GPU_CLASSES[capability]
    for spec in result["specializations"]:
        where = f"specialised for batch x height x width {spec['image']}"
        if dtype != torch.float32:  # half precision must run on the tensor cores
            assert spec[TENSOR_CORE_FIELDS[gpu.tensor_cores]], f"{where}: no {gpu.tensor_cores} in the PTX"
        if not gpu.wgmma:
            assert not spec["wgmma"], f"{where}: wgmma in PTX for sm_{capability}, which has none"
        assert spec["shared"] <= SHARED_MEMORY_LIMIT[capability], (
            f"{where}: {spec['shared']} bytes of shared memory > {SHARED_MEMORY_LIMIT[capability]}")
        assert spec["divisibility_hints"] == len(spec["divisible"]) > 0, where  # the hints reached the compiler
        ieee_on_tensor_cores = dtype == torch.float32 and options.get("precision", "ieee") == "ieee" and (
            capability, case.split("-")[0]) in IEEE_ON_TENSOR_CORES
        if dtype == torch.float32 and options.get("precision", "ieee") == "ieee":  # IEEE fp32: no tensor cores
            tensor_cores = [field for field in TENSOR_CORE_FIELDS.values() if spec[field]]
            assert tensor_cores == (["tcgen05"] if ieee_on_tensor_cores else []), f"{where}: {tensor_cores}"
        if not (ieee_on_tensor_cores and case.startswith("patch_embed_grad_weight_kernel")):
            assert spec["vector_loads"] > 0, f"{where}: no 16-byte global load in the PTX"
        if case.startswith("patch_embed_fwd_kernel"):  # inference; the backward kernels' spills: kernels/patch_embed.py
            assert spec["stack"] == spec["local_bytes"] == 0, (
                f"{where}: {spec['stack']} stack bytes per thread (register spills) at {spec['registers']} registers")
        if not options.get("many_ar", True):
            # Every operand of a landscape-only launch is contiguous along one axis (a ManyAR
            # portrait sample is read transposed), so none is copied to shared memory in pieces.
            assert spec["narrow_async_copies"] == 0, f"{where}: {spec['narrow_async_copies']} 4/8-byte cp.async"


@cpu_ci_only
def test_real_image_sizes_give_distinct_specialisations(compiled_cases):
    """196 vs 768 tokens and 14 vs 32 columns differ in divisibility: each is compiled, none twice."""
    case = next((c[0] for c in COMPILE_CASES if c[0].startswith("patch_embed_fwd_kernel-sm90-bf16") and c[5]["wide"]),
                None)
    if case is None:
        pytest.skip("the Hopper bf16 forward is not selected by FASTPATCH_COMPILE_CASES")
    assert "error" not in compiled_cases[case], compiled_cases[case]["error"]
    found = compiled_cases[case]["specializations"]
    divisible = [frozenset(spec["divisible"]) for spec in found]
    assert len(divisible) == len(set(divisible)) == 3
    assert any({"num_tokens", "grid_w"} <= d for d in divisible)  # 512x384
    assert any(not {"num_tokens", "grid_w", "total_tokens"} & d for d in divisible)  # one 224x224 image


def _inputs(device):
    img = torch.randn(2, 3, 16, 24)
    weight = torch.randn(16, 3, 8, 8) * 0.1
    bias = torch.randn(16)
    return [t.to(device).requires_grad_() for t in (img, weight, bias)]


def test_custom_ops_pass_opcheck(device):
    img, weight, bias = _inputs(device)
    portrait = torch.tensor([True, False]).to(device)
    torch.library.opcheck(torch.ops.fastpatch.patch_embed_fwd.default, (img, weight, bias, 8, portrait))
    grad_tokens = torch.randn(2, 6, 16).to(device)
    for op in (torch.ops.fastpatch.patch_embed_grad_params, torch.ops.fastpatch.patch_embed_grad_image):
        torch.library.opcheck(op.default, (grad_tokens, img.detach(), weight.detach(), 8, None),
                              test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_forward_backward(device):
    img, weight, bias = _inputs(device)
    true_shape = torch.tensor([[24, 16], [16, 24]]).to(device)

    def step(img, weight, bias, true_shape):
        tokens, pos = fastpatch.patch_embed(img, weight, bias, 8, true_shape, many_ar=True)
        return tokens.square().sum(), pos

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss, pos = compiled(img, weight, bias, true_shape)
    loss.backward()
    grads = [t.grad.clone() for t in (img, weight, bias)]
    for t in (img, weight, bias):
        t.grad = None
    eager_loss, eager_pos = step(img, weight, bias, true_shape)
    eager_loss.backward()
    assert torch.equal(pos, eager_pos)
    torch.testing.assert_close(loss, eager_loss)
    for grad, t in zip(grads, (img, weight, bias)):
        torch.testing.assert_close(grad, t.grad)


if __name__ == "__main__":
    print_compile_results([(case_id, functools.partial(_compile, kernel, capability, dtype, config, **options))
                           for case_id, kernel, capability, dtype, config, options in COMPILE_CASES], sys.argv[1:])

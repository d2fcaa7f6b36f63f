"""Patch embedding under compilers.

* Every kernel, in every dtype and launch configuration :func:`patch_embed_config` can choose,
  compiled ahead of time for sm_80 and sm_90 (catches what the interpreter forgives), in
  subprocesses without the interpreter (this file run as a script, see
  :func:`fastpatch.testing.compile_results_in_subprocesses`).
* The ``fastpatch::`` custom ops pass ``torch.library.opcheck`` and trace under ``torch.compile``
  with ``fullgraph=True`` (no graph breaks), on the ``device`` fixture (interpreter on CPU, or
  compiled kernels on CUDA).
"""
import functools
import sys

import pytest
import torch

import fastpatch
from fastpatch.kernels.patch_embed import (
    PATCH_EMBED_CONFIGS,
    patch_embed_fwd_kernel,
    patch_embed_grad_image_kernel,
    patch_embed_grad_weight_kernel,
)
from fastpatch.ops import patch_embed_triton  # noqa: F401  (registers the fastpatch:: ops)
from fastpatch.testing import (
    SHARED_MEMORY_LIMIT,
    compile_results_in_subprocesses,
    compile_summary,
    print_compile_results,
)
from modes import cpu_ci_only

KERNELS = [patch_embed_fwd_kernel, patch_embed_grad_weight_kernel, patch_embed_grad_image_kernel]
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _launchable():
    """(capability, dtype, config) for every distinct config the table holds, each dtype it serves."""
    seen = set()
    for (capability, kind, _), config in PATCH_EMBED_CONFIGS.items():
        for dtype in ([torch.float32] if kind == "fp32" else [torch.float16, torch.bfloat16]):
            if (capability, dtype, config) not in seen:
                seen.add((capability, dtype, config))
                yield capability, dtype, config


def _compile_cases():
    """(case id, kernel, capability, dtype, config, options) for every compile the tests check."""
    for kernel in KERNELS:
        for capability, dtype, config in _launchable():
            case = f"{kernel.__name__}-sm{capability}-{TRITON_DTYPES[dtype]}-{'x'.join(map(str, config))}"
            yield case, kernel, capability, dtype, config, {}
        for capability in (80, 90):
            # The other constexpr paths: PatchEmbedDust3R (no ManyAR flags) with TF32 fp32 products.
            config = max(c for (cap, kind, _), c in PATCH_EMBED_CONFIGS.items() if cap == capability and kind == "fp32")
            options = dict(many_ar=False, precision="tf32")
            yield f"{kernel.__name__}-sm{capability}-fp32-plain-tf32", kernel, capability, torch.float32, config, options


COMPILE_CASES = list(_compile_cases())


def _signature(kernel, dtype: torch.dtype):
    element = TRITON_DTYPES[dtype]
    special = {"portrait_ptr": "*i1", "pos_ptr": "*i64"}
    signature = {}
    for name in kernel.arg_names:
        if name.isupper():
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = special.get(name, f"*{element}")
        else:
            signature[name] = "i32"
    return signature


def _compile(kernel, capability, dtype, config, many_ar=True, precision="ieee"):
    constexprs = dict(PATCH=16, MANY_AR=many_ar, UPCAST=False, DOT_PRECISION=precision,
                      BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k)
    return compile_summary(kernel, _signature(kernel, dtype), constexprs, capability,
                           num_warps=config.num_warps, num_stages=config.num_stages)


@pytest.fixture(scope="module")
def compiled_cases():
    """case id -> compile result (or its error), from subprocesses without the interpreter."""
    return compile_results_in_subprocesses(__file__, timeout=600)


@cpu_ci_only
@pytest.mark.parametrize("case,capability,dtype", [c[:1] + c[2:4] for c in COMPILE_CASES],
                         ids=[c[0] for c in COMPILE_CASES])
def test_compiles_for_gpu(compiled_cases, case, capability, dtype):
    result = compiled_cases[case]
    assert "error" not in result, result.get("error")
    if dtype != torch.float32:  # half precision must run on the tensor cores
        assert result["wgmma"] if capability == 90 else result["mma_sync"]
    assert result["shared"] <= SHARED_MEMORY_LIMIT[capability]


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

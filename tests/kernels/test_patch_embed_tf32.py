"""fp32 patch embedding on CUDA follows torch's cuDNN TF32 switch, as the conv2d it replaces does:
switch on, the kernels run TF32 (within the TF32 bound, and visibly less exact than IEEE fp32);
switch off, IEEE fp32 (within the fp32 bound). Compiled mode only: the interpreter computes fp32
products exactly whatever precision it is asked for (tests/kernels/test_patch_embed_launch.py checks on CPU
that the launches ask for the right one)."""
import pytest
import torch

import fastpatch
from fastpatch.testing import TOLERANCES, assert_close_to_reference, relative_error

from modes import COMPILED

pytestmark = pytest.mark.skipif(not COMPILED, reason="needs compiled kernels on CUDA (FASTPATCH_TEST_COMPILED=1)")


def _run(img, weight, bias, grad_tokens, allow_tf32):
    """Tokens and grads (img, weight, bias) with ``torch.backends.cudnn.allow_tf32`` set (conftest restores it)."""
    torch.backends.cudnn.allow_tf32 = allow_tf32
    leaves = [t.detach().clone().requires_grad_() for t in (img, weight, bias)]
    with fastpatch.use_backend("triton"):
        tokens, _ = fastpatch.patch_embed(*leaves, 16)
    tokens.backward(grad_tokens)
    return tokens.detach(), [t.grad for t in leaves]


def test_fp32_precision_follows_the_cudnn_tf32_switch(device):
    img = torch.randn(2, 3, 64, 96)
    weight = torch.randn(128, 3, 16, 16) * 16 ** -1
    bias = torch.randn(128)
    grad_tokens = torch.randn(2, 24, 128)
    ref_leaves = [t.double().requires_grad_() for t in (img, weight, bias)]
    expected = torch.nn.functional.conv2d(*ref_leaves, stride=16).flatten(2).transpose(1, 2)
    expected.backward(grad_tokens.double())
    ref_grads = [t.grad for t in ref_leaves]

    args = [t.to(device) for t in (img, weight, bias, grad_tokens)]
    for allow_tf32, bound in ((True, "tf32"), (False, torch.float32)):
        tokens, grads = _run(*args, allow_tf32)
        assert_close_to_reference(tokens, expected.detach(), bound, what=f"tokens (allow_tf32={allow_tf32})")
        for what, grad, ref in zip(("grad img", "grad weight", "grad bias"), grads, ref_grads):
            assert_close_to_reference(grad, ref, bound, kind="backward", what=f"{what} (allow_tf32={allow_tf32})")
        if allow_tf32:  # TF32 really ran: 10-bit operands over K = 768 miss the fp32 bar
            assert relative_error(tokens, expected) > TOLERANCES[torch.float32].forward

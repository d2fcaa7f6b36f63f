"""Eager calls that nothing records skip the custom ops' dispatch (fastpatch.ops.direct_launch).

Inference (``no_grad`` / ``inference_mode``, or inputs that do not require grad) calls the Triton
launchers directly; autograd, ``torch.compile``, fake tensors, torch function/dispatch modes and
functorch transforms keep the custom ops. Both paths must give the same numbers.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastpatch
from fastpatch.ops import patch_embed_triton, rope_attention_triton
from fastpatch.ops.direct_launch import launch_directly


class _PassThroughDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _PassThroughFunction(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_launch_directly_only_when_nothing_records_the_call():
    plain, leaf = torch.ones(2), torch.ones(2, requires_grad=True)
    assert launch_directly(plain, None, plain)
    assert not launch_directly(plain, leaf)  # autograd records it
    with torch.no_grad():
        assert launch_directly(plain, leaf)
    with torch.inference_mode():
        assert launch_directly(plain, leaf)
    with _PassThroughDispatch():
        assert not launch_directly(plain)
    with _PassThroughFunction():
        assert not launch_directly(plain)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(plain)
    assert not launch_directly(fake)  # a tensor subclass, even outside its mode
    seen = []
    torch.func.vmap(lambda x: seen.append(launch_directly(plain)) or x)(torch.ones(3, 2))
    assert seen == [False]


@pytest.fixture
def custom_op_calls(monkeypatch):
    """Counts the custom-op calls of both ops (the wrappers still run the real ops)."""
    calls = []
    for module, name in ((rope_attention_triton, "rope_attention_fwd"), (patch_embed_triton, "_patch_embed_fwd")):
        op = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _op=op, _name=name: calls.append(_name) or _op(*args))
    return calls


def _attention(device, requires_grad=False):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 64, device=device, requires_grad=requires_grad) for _ in range(3))
    index = torch.arange(32, device=device)
    pos = torch.stack((index // 8, index % 8), dim=-1)[None]
    return q, k, v, pos


def _patch_embed(device, requires_grad=False):
    torch.manual_seed(0)
    return (torch.randn(2, 3, 32, 48, device=device, requires_grad=requires_grad),
            torch.randn(64, 3, 16, 16, device=device, requires_grad=requires_grad),
            torch.randn(64, device=device, requires_grad=requires_grad))


def test_inference_calls_skip_the_custom_ops_with_identical_results(device, custom_op_calls):
    q, k, v, pos = _attention(device)
    img, weight, bias = _patch_embed(device)
    with torch.no_grad():
        direct = fastpatch.rope_attention(q, k, v, pos), fastpatch.patch_embed(img, weight, bias, 16)
    assert custom_op_calls == []
    with _PassThroughFunction():  # a mode keeps the custom ops
        through_ops = fastpatch.rope_attention(q, k, v, pos), fastpatch.patch_embed(img, weight, bias, 16)
    assert custom_op_calls == ["rope_attention_fwd", "_patch_embed_fwd"]
    torch.testing.assert_close(direct[0], through_ops[0], rtol=0, atol=0)
    for a, b in zip(direct[1], through_ops[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_autograd_keeps_the_custom_ops(device, custom_op_calls):
    q, k, v, pos = _attention(device, requires_grad=True)
    fastpatch.rope_attention(q, k, v, pos).sum().backward()
    img, weight, bias = _patch_embed(device, requires_grad=True)
    fastpatch.patch_embed(img, weight, bias, 16)[0].sum().backward()
    assert custom_op_calls == ["rope_attention_fwd", "_patch_embed_fwd"]
    assert all(t.grad is not None for t in (q, k, v, img, weight, bias))


def test_compiled_inference_keeps_the_custom_ops(device, custom_op_calls):
    """Under torch.compile the ops are traced (fake implementations), also without grad."""
    q, k, v, pos = _attention(device)

    def attend(q, k, v, pos):
        return fastpatch.rope_attention(q, k, v, pos) * 2

    with torch.no_grad():
        compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)(q, k, v, pos)
        eager = attend(q, k, v, pos)
    assert "rope_attention_fwd" in custom_op_calls
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_jit_tracing_keeps_the_custom_ops(device, custom_op_calls):
    """torch.jit.trace records ops, not launches: a traced inference call must hold the custom op, so the
    traced function computes on new inputs (a direct launch would leave only the output allocation)."""
    q, k, v, pos = _attention(device)

    def attend(q, k, v, pos):
        return fastpatch.rope_attention(q, k, v, pos)

    with torch.no_grad():
        traced = torch.jit.trace(attend, (q, k, v, pos), check_trace=False)
        new = tuple(t * 0.5 for t in (q, k, v)) + (pos,)
        torch.testing.assert_close(traced(*new), attend(*new), rtol=0, atol=0)
    assert "rope_attention_fwd" in custom_op_calls

"""fastpatch's Attention, CrossAttention, Block and DecoderBlock against upstream DUSt3R (mini_dust3r.croco).

Upstream modules get perturbed weights (upstream init zeroes biases), ours load the same state_dict
strictly, and forward outputs, input gradients and every parameter gradient are compared in fp32
through both backends: the torch path (CPU) and the Triton kernels (on the ``device`` fixture:
interpreter on CPU, small sizes, or compiled on CUDA). Upstream always runs on CPU as the reference.
"""
import importlib

import pytest
import torch

import fastpatch
from fastpatch.testing import TOLERANCES, assert_close_to_reference
from upstream import perturb_

from modes import device_for

DIM, HEADS, NX, NY = 64, 2, 37, 23
BACKENDS = ["torch", "triton"]


def _backend_or_skip(backend: str) -> None:
    if backend == "triton":
        try:
            importlib.import_module("fastpatch.ops.rope_attention_triton")
        except ImportError as exc:
            pytest.skip(f"fastpatch.ops.rope_attention_triton is not available yet: {exc}")


def _positions(batch: int, tokens: int, width: int) -> torch.Tensor:
    k = torch.arange(tokens)
    return torch.stack((k // width, k % width), dim=-1).expand(batch, tokens, 2).contiguous()


def build_pair(upstream, kind: str, rope: bool, **kwargs):
    """(upstream module with perturbed weights, fastpatch module with the same state_dict)."""
    up_rope = upstream.rope.RoPE2D(freq=100.0) if rope else None
    our_rope = fastpatch.RoPE2D(freq=100.0) if rope else None
    up = perturb_(getattr(upstream.blocks, kind)(DIM, num_heads=HEADS, qkv_bias=True, rope=up_rope, **kwargs))
    ours = getattr(fastpatch, kind)(DIM, num_heads=HEADS, qkv_bias=True, rope=our_rope, **kwargs)
    assert list(ours.state_dict()) == list(up.state_dict())
    ours.load_state_dict(up.state_dict(), strict=True)
    return up, ours


def make_inputs(kind: str):
    """Forward arguments (inputs require grad) for one module kind; batch 2, Nx=37 tokens, Ny=23."""
    x = torch.randn(2, NX, DIM, requires_grad=True)
    y = torch.randn(2, NY, DIM, requires_grad=True)
    xpos, ypos = _positions(2, NX, width=8), _positions(2, NY, width=5)
    if kind in ("Attention", "Block"):
        return (x, xpos)
    if kind == "CrossAttention":
        return (x, y, y, xpos, ypos)
    return (x, y, xpos, ypos)


def first_output(result):
    return result[0] if isinstance(result, tuple) else result


def to_device(inputs, device: torch.device):
    """The same inputs on ``device``; the floating ones as fresh leaves requiring grad. An input passed
    twice (CrossAttention's key and value) stays one tensor, so its gradient sums both uses."""
    moved = {}
    for t in inputs:
        if id(t) not in moved:
            moved[id(t)] = t.detach().to(device).requires_grad_() if t.is_floating_point() else t.to(device)
    return tuple(moved[id(t)] for t in inputs)


def check_module(up, ours, inputs, backend: str, training: bool = False, device: torch.device = None) -> None:
    """Upstream on CPU (the reference); ours on ``device`` (default CPU) under ``backend``."""
    device = torch.device("cpu") if device is None else device
    up.train(training)
    ours.to(device).train(training)
    tensors = [t for t in inputs if t.is_floating_point()]
    expected = first_output(up(*inputs))
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, tensors + list(up.parameters()), grad_out)
    our_inputs = to_device(inputs, device)
    with fastpatch.use_backend(backend):
        out = first_output(ours(*our_inputs))
    our_tensors = [t for t in our_inputs if t.is_floating_point()]
    grads = torch.autograd.grad(out, our_tensors + list(ours.parameters()), grad_out.to(device))
    grads = [g.cpu() for g in grads]
    assert_close_to_reference(out, expected, torch.float32, what="output")
    names = [f"input {i}" for i in range(len(tensors))] + [name for name, _ in ours.named_parameters()]
    largest = max(e.abs().max().item() for e in expected_grads)
    for name, g, e in zip(names, grads, expected_grads):
        if e.abs().max().item() < 1e-4 * largest:
            # Zero in exact arithmetic (without RoPE a key bias shifts every score of a query equally and
            # softmax ignores it): both sides hold rounding noise, so measure it against the largest gradient.
            assert (g - e).abs().max().item() <= TOLERANCES[torch.float32].backward * largest, f"grad {name}"
        else:
            assert_close_to_reference(g, e, torch.float32, kind="backward", what=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["Attention", "CrossAttention", "Block", "DecoderBlock"])
def test_matches_upstream_with_rope100(upstream, kind, backend, device):
    _backend_or_skip(backend)
    up, ours = build_pair(upstream, kind, rope=True)
    check_module(up, ours, make_inputs(kind), backend, device=device_for(backend, device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["Attention", "DecoderBlock"])
def test_matches_upstream_without_rope(upstream, kind, backend, device):
    """rope=None: plain attention (the CroCo cosine configuration); positions are ignored."""
    _backend_or_skip(backend)
    up, ours = build_pair(upstream, kind, rope=False)
    check_module(up, ours, make_inputs(kind), backend, device=device_for(backend, device))


def test_accepts_an_upstream_rope_object(upstream):
    up, ours = build_pair(upstream, "Block", rope=True)
    ours.attn.rope = up.attn.rope  # any RoPE2D exposing .base and .F0
    with fastpatch.use_backend("torch"):
        check_module(up, ours, make_inputs("Block"), "torch")


def test_rejects_a_rope_without_base_and_f0(device):
    attn = fastpatch.Attention(DIM, rope=torch.nn.Identity(), num_heads=HEADS).to(device)
    with pytest.raises(TypeError, match="rope must be a RoPE2D"):
        attn(torch.randn(1, 4, DIM, device=device), _positions(1, 4, width=2).to(device))


def test_rope2d_module_matches_upstream(upstream):
    tokens = torch.randn(2, 3, NX, 16, dtype=torch.float64)
    pos = _positions(2, NX, width=8)
    expected = upstream.rope.RoPE2D(freq=100.0)(tokens.float(), pos)
    assert_close_to_reference(fastpatch.RoPE2D(freq=100.0)(tokens.float(), pos), expected, torch.float32)
    with pytest.raises(ValueError, match="divisible by 4"):
        fastpatch.RoPE2D()(torch.randn(1, 1, 4, 6), _positions(1, 4, width=2))


def test_mlp_is_the_reference_mlp(upstream):
    up = perturb_(upstream.blocks.Mlp(DIM, hidden_features=2 * DIM))
    ours = fastpatch.Mlp(DIM, hidden_features=2 * DIM)
    ours.load_state_dict(up.state_dict(), strict=True)
    x = torch.randn(2, NX, DIM)
    assert_close_to_reference(ours(x), up(x), torch.float32)


@pytest.mark.parametrize("kind", ["Block", "DecoderBlock"])
def test_dropout_and_drop_path_act_in_training_only(upstream, kind):
    up, ours = build_pair(upstream, kind, rope=True, drop=0.2, attn_drop=0.3, drop_path=0.4)
    inputs = make_inputs(kind)
    check_module(up, ours, inputs, "torch", training=False)  # identities at inference
    ours.train()
    with fastpatch.use_backend("torch"):
        first, second = first_output(ours(*inputs)), first_output(ours(*inputs))
    assert not torch.equal(first, second), "dropout / drop_path had no effect in training"


def test_attention_dropout_in_training_warns_and_runs_the_torch_path(upstream, device):
    _, ours = build_pair(upstream, "Attention", rope=True, attn_drop=0.5)
    ours.to(device).train()
    with fastpatch.use_backend("triton"), pytest.warns(RuntimeWarning, match="no dropout"):
        out = ours(*to_device(make_inputs("Attention"), device))
    assert out.shape == (2, NX, DIM)

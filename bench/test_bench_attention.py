"""RoPE attention and the transformer blocks: eager reference vs torch path vs fastpatch.

Components at DUSt3R's sizes (head dim 64): the ``rope_attention`` op (16 heads), self-attention and
the encoder ``block`` at 1024 channels / 16 heads, ``cross_attention`` and ``decoder_block`` at
768 / 12, on 768 tokens (512x384 image, 24x32 grid) and 196 tokens (224x224, 14x14).

Default (sized for a 2-core CPU): the op, ``block`` and ``decoder_block``, forward and forward +
backward, 768 tokens, batch 1 (bfloat16 on CUDA, float32 on CPU). ``FASTPATCH_BENCH_FULL=1``: every
component, 196 and 768 tokens, batch 1 and 8, and float32 too on CUDA.

Providers (:mod:`bench.cases`): ``eager`` (separate RoPE pass, explicit softmax), ``torch_path`` (CUDA),
``fastpatch``; on CUDA the op also runs the Triton kernel with each K rotation strategy,
``triton_in_loop`` (key tiles rotated in registers inside the attention loops) and
``triton_pre_rotated`` (one RoPE pass writes rotated K first), against the same eager and torch path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import pytest
import torch

import fastpatch
from fastpatch import reference

from . import flops
from .cases import BACKENDS, DEVICE, EAGER, FASTPATCH, FULL, TORCH_PATH, Case, Side, base_providers, make_step, measure

GRIDS = {768: (24, 32), 196: (14, 14)}  # tokens -> (rows, cols)
ROPE_BASE = 100.0
K_ROTATIONS = {"triton_in_loop": "in_loop", "triton_pre_rotated": "pre_rotated"}
ROUNDS = 10 if DEVICE == "cuda" else 3


@dataclass(frozen=True)
class Component:
    """One thing under test: the op or a module (class name in fastpatch / fastpatch.reference)."""

    name: str
    cls: str  # "rope_attention" for the functional op
    dim: int
    heads: int

    def build(self, namespace) -> torch.nn.Module:
        rope = namespace.RoPE2D(freq=ROPE_BASE)
        if self.cls in ("Attention", "CrossAttention"):
            return getattr(namespace, self.cls)(self.dim, rope=rope, num_heads=self.heads, qkv_bias=True)
        return getattr(namespace, self.cls)(self.dim, self.heads, qkv_bias=True, rope=rope)

    def inputs(self, case: Case, requires_grad: bool) -> Tuple:
        tokens = int(case.size[1:])
        cols = GRIDS[tokens][1]
        k = torch.arange(tokens, device=case.device)
        pos = torch.stack((k // cols, k % cols), dim=-1).expand(case.batch, tokens, 2).contiguous()

        def tensor(*shape):
            return torch.randn(*shape, device=case.device, dtype=case.dtype, requires_grad=requires_grad)
        if self.cls == "rope_attention":
            head_dim = self.dim // self.heads
            return tuple(tensor(case.batch, self.heads, tokens, head_dim) for _ in range(3)) + (pos,)
        x = tensor(case.batch, tokens, self.dim)
        if self.cls in ("Attention", "Block"):
            return (x, pos)
        y = tensor(case.batch, tokens, self.dim)
        return (x, y, y, pos, pos.flip(1)) if self.cls == "CrossAttention" else (x, y, pos, pos.flip(1))

    def flops(self, case: Case) -> float:
        tokens = int(case.size[1:])
        if self.cls != "rope_attention":
            return flops.component(self.name, case.mode, case.batch, tokens, self.dim)
        core = flops.attention_core(case.batch, self.heads, tokens, tokens, self.dim // self.heads)
        return flops.mode_factors(case.mode)[1] * core


COMPONENTS = {
    "rope_attention": Component("rope_attention", "rope_attention", 1024, 16),
    "attention": Component("attention", "Attention", 1024, 16),
    "cross_attention": Component("cross_attention", "CrossAttention", 768, 12),
    "block": Component("block", "Block", 1024, 16),
    "decoder_block": Component("decoder_block", "DecoderBlock", 768, 12),
}


def eager_rope_attention(q, k, v, pos):
    """Upstream's op order: a separate RoPE pass on q and k, then softmax(q k^T scale) v materialised."""
    rope = reference.RoPE2D(freq=ROPE_BASE)
    q, k = rope(q, pos), rope(k, pos)
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v


def fastpatch_rope_attention(q, k, v, pos):
    return fastpatch.rope_attention(q, k, v, pos, pos, rope_base=ROPE_BASE)


def triton_rope_attention(k_rotation: str):
    """The Triton op called directly with a forced K rotation strategy (CUDA)."""
    from fastpatch.ops.rope_attention_triton import rope_attention_triton

    def call(q, k, v, pos):
        out = rope_attention_triton(q, k, v, pos, pos, ROPE_BASE, 1.0, q.shape[-1] ** -0.5, k_rotation=k_rotation)
        return out.transpose(1, 2)  # (B, N, H, Dh) -> (B, H, N, Dh), like the other providers
    return call


def providers(component: str) -> List[str]:
    extra = list(K_ROTATIONS) if component == "rope_attention" and DEVICE == "cuda" else []
    return base_providers() + extra


def build_sides(case: Case) -> Dict[str, Side]:
    """Every provider's call on shared inputs and (for modules) one set of weights."""
    spec = COMPONENTS[case.component]
    torch.manual_seed(0)
    inputs = spec.inputs(case, requires_grad=case.mode == "forward_backward")
    if spec.cls == "rope_attention":
        calls = {EAGER: eager_rope_attention, TORCH_PATH: fastpatch_rope_attention, FASTPATCH: fastpatch_rope_attention,
                 **{name: triton_rope_attention(rotation) for name, rotation in K_ROTATIONS.items()}}
        return {name: Side(make_step(calls[name], inputs, case.mode, case.device, BACKENDS.get(name)))
                for name in providers(case.component)}
    eager = spec.build(reference).to(case.device, case.dtype)
    patched = spec.build(fastpatch).to(case.device, case.dtype)
    patched.load_state_dict(eager.state_dict())
    sides = {}
    for name in providers(case.component):
        module = eager if name == EAGER else patched
        sides[name] = Side(make_step(module, inputs, case.mode, case.device, BACKENDS[name],
                                     params=list(module.parameters()) if case.mode == "forward_backward" else ()))
    return sides


def _cases() -> List[Case]:
    """The default cases, then (full matrix) the rest: a run cut short by a timeout keeps the default ones."""
    default_dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    default = [Case(component, mode, "n768", 1, default_dtype, DEVICE)
               for component in ("rope_attention", "block", "decoder_block")
               for mode in ("forward", "forward_backward")]
    if not FULL:
        return default
    dtypes = [torch.bfloat16, torch.float32] if DEVICE == "cuda" else [torch.float32]
    full = [Case(component, mode, f"n{tokens}", batch, dtype, DEVICE)
            for dtype in dtypes for batch in (1, 8) for tokens in GRIDS for component in COMPONENTS
            for mode in ("forward", "forward_backward")]
    return default + [case for case in full if case not in default]


CASE_PROVIDERS = [(case, provider) for case in _cases() for provider in providers(case.component)]


@pytest.mark.parametrize("case,provider", CASE_PROVIDERS, ids=[f"{c.name}-{p}" for c, p in CASE_PROVIDERS])
def test_bench_attention(benchmark, case, provider):
    benchmark.group = case.name
    measure(benchmark, case, provider, build_sides(case), COMPONENTS[case.component].flops(case), rounds=ROUNDS)

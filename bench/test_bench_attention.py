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
Also for the op on CUDA (issue 11's baselines): in bfloat16/float16 the torch path with one SDPA
backend forced, ``sdpa_flash`` and ``sdpa_cudnn`` (a backend that cannot run these inputs skips its
row and drops out of the others' partners), timed before each ``fastpatch`` round too; in float32
forward, ``eager_tf32`` and ``fastpatch_tf32`` with TF32 matmuls allowed (the session turns TF32
off), ``fastpatch_tf32`` timed against ``eager_tf32``; their rows record dtype ``"tfloat32"``, so
the report takes TF32's dense peak. ``FASTPATCH_BENCH_FULL=1`` runs issue 11's op shapes (batch 8,
768 tokens) right after the default cases, so a run cut short by a timeout keeps them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastpatch
from fastpatch import reference

from . import flops
from .cases import BACKENDS, DEVICE, EAGER, FASTPATCH, FULL, TORCH_PATH, Case, Side, base_providers, make_step, measure

GRIDS = {768: (24, 32), 196: (14, 14)}  # tokens -> (rows, cols)
ROPE_BASE = 100.0
K_ROTATIONS = {"triton_in_loop": "in_loop", "triton_pre_rotated": "pre_rotated"}
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}  # torch path, SDPA backend forced
EAGER_TF32, FASTPATCH_TF32 = "eager_tf32", "fastpatch_tf32"
TF32 = {EAGER_TF32: EAGER, FASTPATCH_TF32: FASTPATCH}  # float32 with TF32 matmuls -> the provider it runs
PROVIDER_BACKENDS = {**BACKENDS, **{name: "torch" for name in SDPA_BACKENDS},
                     **{name: BACKENDS[runs] for name, runs in TF32.items()}}
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


def sdpa_rope_attention(backend: str):
    """The torch path with SDPA restricted to ``backend`` (an ``SDPBackend`` name)."""
    def call(q, k, v, pos):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return fastpatch_rope_attention(q, k, v, pos)
    return call


def with_tf32(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` with TF32 allowed for float32 CUDA matmuls (torch's and fastpatch's), restored after."""
    def tf32_step():
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return step()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    return tf32_step


def providers(case: Case) -> List[str]:
    """The base providers; the op on CUDA adds the K rotations, and the forced SDPA backends (half
    precision) or, in float32 forward, the TF32 pair."""
    extra = []
    if case.component == "rope_attention" and case.device == "cuda":
        extra = list(K_ROTATIONS)
        if case.dtype != torch.float32:
            extra += list(SDPA_BACKENDS)
        elif case.mode == "forward":
            extra += list(TF32)
    return base_providers(case.device) + extra


def build_sides(case: Case) -> Dict[str, Side]:
    """Every provider's call on shared inputs and (for modules) one set of weights."""
    spec = COMPONENTS[case.component]
    torch.manual_seed(0)
    inputs = spec.inputs(case, requires_grad=case.mode == "forward_backward")
    if spec.cls == "rope_attention":
        calls = {EAGER: eager_rope_attention, TORCH_PATH: fastpatch_rope_attention, FASTPATCH: fastpatch_rope_attention,
                 EAGER_TF32: eager_rope_attention, FASTPATCH_TF32: fastpatch_rope_attention,
                 **{name: triton_rope_attention(rotation) for name, rotation in K_ROTATIONS.items()},
                 **{name: sdpa_rope_attention(backend) for name, backend in SDPA_BACKENDS.items()}}
        steps = {name: make_step(calls[name], inputs, case.mode, case.device, PROVIDER_BACKENDS.get(name))
                 for name in providers(case)}
        return {name: Side(with_tf32(step) if name in TF32 else step) for name, step in steps.items()}
    eager = spec.build(reference).to(case.device, case.dtype)
    patched = spec.build(fastpatch).to(case.device, case.dtype)
    patched.load_state_dict(eager.state_dict())
    sides = {}
    for name in providers(case):
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
    issue_targets = [case for case in full
                     if case.component == "rope_attention" and case.size == "n768" and case.batch == 8]
    return list(dict.fromkeys(default + issue_targets + full))


CASE_PROVIDERS = [(case, provider) for case in _cases() for provider in providers(case)]


def _unusable_sdpa(sides: Dict[str, Side]) -> Dict[str, str]:
    """Forced SDPA backends that cannot run these inputs (on this GPU / build) -> torch's error."""
    unusable = {}
    for name in (name for name in SDPA_BACKENDS if name in sides):
        try:
            sides[name]()
        except RuntimeError as error:
            unusable[name] = str(error).strip().splitlines()[0]
    return unusable


def _partners(provider: str, sides: Dict[str, Side]) -> Optional[List[str]]:
    """Who runs before each round: fastpatch also against the forced SDPA backends, fastpatch_tf32
    against eager_tf32; None: the default (eager, torch path)."""
    if provider == FASTPATCH:
        return [name for name in (EAGER, TORCH_PATH, *SDPA_BACKENDS) if name in sides]
    return [EAGER_TF32] if provider == FASTPATCH_TF32 else None


@pytest.mark.parametrize("case,provider", CASE_PROVIDERS, ids=[f"{c.name}-{p}" for c, p in CASE_PROVIDERS])
def test_bench_attention(benchmark, case, provider):
    benchmark.group = case.name
    sides = build_sides(case)
    unusable = _unusable_sdpa(sides) if provider in (FASTPATCH, *SDPA_BACKENDS) else {}
    if provider in unusable:
        pytest.skip(f"{provider} cannot run {case.name}: {unusable[provider]}")
    for name in unusable:
        del sides[name]
    measure(benchmark, case, provider, sides, COMPONENTS[case.component].flops(case), rounds=ROUNDS,
            partners=_partners(provider, sides), baseline=EAGER_TF32 if provider == FASTPATCH_TF32 else EAGER)
    if provider in TF32:
        benchmark.extra_info["dtype"] = "tfloat32"

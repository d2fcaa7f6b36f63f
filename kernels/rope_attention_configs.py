"""Launch configurations of the RoPE flash-attention kernels: a plain table, no autotuning.

Keyed by head dim (32, 64, 128), storage dtype, compute-capability class and, for float32, the
dot precision (see :data:`DOT_PRECISIONS`): ``90`` for Hopper
(sm_90, 227 KB shared memory per block), ``80`` for everything else the kernels run on (A100's
sm_80 with 163 KB, but also sm_86/89 with ~99 KB, so the ``80`` entries stay under 99 KB; the
interpreter uses them too). The DUSt3R family runs N = 196..768 tokens with 12-16 heads, so
query blocks of 64 keep enough programs in flight (B*H*cdiv(N, 64)) for a GPU's SMs.

Tile sizes are powers of two >= 16 (``tl.dot`` minimum); M = 64 per warpgroup lets Hopper use
wgmma with 4 warps. IEEE fp32 runs the non-tensor-core (``ieee``) dot, whose operands take twice
the registers and shared memory, hence the smaller tiles and no software pipelining (1 stage).
TF32 fp32 (``tf32``: tensor cores, operands rounded to a 10-bit mantissa) keeps fp32 operands in
registers and shared memory too, so its entries take the half-precision tile shapes where they fit
(Dh 32/64; the forward and dQ with 2 stages, dK/dV with 1) and IEEE fp32's backward tiles at Dh 128,
within sm_80's 99 KB. These TF32 tiles were chosen from the shared memory of the AOT compiles, not
tuned on a GPU.

No entry has been timed on a GPU yet. Static evidence (CPU compiles, triton 3.7.1,
``bench/results/2026-11-27-static/``): on sm_90 every head-dim-64 fp16/bf16 entry compiles without
register spills (the compile tests hold that); the IEEE-fp32 and TF32 backward entries and, on sm_80,
the half-precision dK/dV entry spill (200 B per thread there; 32-row query tiles do not). Tuning:
``bench/sweep_attention.py`` on a GPU (``bench/gpu_tune.sh``), then record the choice and its results
folder here.
"""
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

__all__ = ["KernelConfig", "RopeAttentionConfig", "HEAD_DIMS", "CAPABILITY_CLASSES", "K_ROTATIONS", "DOT_PRECISIONS",
           "capability_class", "dot_precisions", "rope_attention_config"]

HEAD_DIMS = (32, 64, 128)
CAPABILITY_CLASSES = (80, 90)
#: How the keys get rotated: "in_loop" rotates each key tile inside the attention loop (every query
#: block redoes it); "pre_rotated" runs the RoPE kernel once to write rotated copies first.
K_ROTATIONS = ("in_loop", "pre_rotated")
#: ``tl.dot`` input precisions of the float32 kernels: IEEE fp32, or TF32 tensor cores (what torch's
#: own fp32 matmuls do when ``torch.backends.cuda.matmul.allow_tf32`` is set). fp16/bf16 use "ieee"
#: (the flag does not apply to them).
DOT_PRECISIONS = ("ieee", "tf32")


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel: query block, key block, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class RopeAttentionConfig:
    """Everything the launchers choose for one (head dim, dtype, capability class)."""

    forward: KernelConfig
    backward_dq: KernelConfig
    backward_dkdv: KernelConfig
    rope_block: int  # rows per program of the standalone RoPE kernel
    k_rotation: str = "in_loop"


_HALF = KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
_HALF_DKDV = KernelConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)
_HALF_WIDE_HEAD = KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
_HALF_DKDV_WIDE_HEAD = KernelConfig(block_m=32, block_n=64, num_warps=8, num_stages=2)
_FP32 = KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=1)
_FP32_WIDE_HEAD = KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
_FP32_BWD = KernelConfig(block_m=64, block_n=32, num_warps=8, num_stages=1)
_FP32_DKDV = KernelConfig(block_m=32, block_n=64, num_warps=8, num_stages=1)
_TF32 = KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
_TF32_DKDV = KernelConfig(block_m=64, block_n=64, num_warps=8, num_stages=1)
_TF32_WIDE_HEAD = KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=1)


def _entry(forward: KernelConfig, backward_dq: KernelConfig, backward_dkdv: KernelConfig,
           head_dim: int) -> RopeAttentionConfig:
    # RoPE kernel: 2048 elements per program (64 rows at Dh 32) keeps it under ~150 registers
    return RopeAttentionConfig(forward=forward, backward_dq=backward_dq, backward_dkdv=backward_dkdv,
                               rope_block=2048 // head_dim)


_TABLE: Dict[Tuple[int, torch.dtype, int, str], RopeAttentionConfig] = {}
for _cap in CAPABILITY_CLASSES:
    for _dtype in (torch.float16, torch.bfloat16):
        _TABLE[(32, _dtype, _cap, "ieee")] = _entry(_HALF, _HALF, _HALF, 32)
        _TABLE[(64, _dtype, _cap, "ieee")] = _entry(_HALF, _HALF, _HALF_DKDV, 64)
        _TABLE[(128, _dtype, _cap, "ieee")] = _entry(_HALF_WIDE_HEAD, _HALF_WIDE_HEAD, _HALF_DKDV_WIDE_HEAD, 128)
    _TABLE[(32, torch.float32, _cap, "ieee")] = _entry(_FP32, _FP32, _FP32_DKDV, 32)
    _TABLE[(64, torch.float32, _cap, "ieee")] = _entry(_FP32, _FP32_BWD, _FP32_DKDV, 64)
    _TABLE[(128, torch.float32, _cap, "ieee")] = _entry(_FP32_WIDE_HEAD, _FP32_WIDE_HEAD, _FP32_WIDE_HEAD, 128)
    _TABLE[(32, torch.float32, _cap, "tf32")] = _entry(_TF32, _TF32, _TF32_DKDV, 32)
    _TABLE[(64, torch.float32, _cap, "tf32")] = _entry(_TF32, _TF32, _TF32_DKDV, 64)
    _TABLE[(128, torch.float32, _cap, "tf32")] = _entry(_TF32_WIDE_HEAD, _FP32_WIDE_HEAD, _FP32_WIDE_HEAD, 128)


def dot_precisions(dtype: torch.dtype) -> Tuple[str, ...]:
    """The dot precisions the kernels run in for ``dtype``: both for float32, ``("ieee",)`` otherwise."""
    return DOT_PRECISIONS if dtype == torch.float32 else ("ieee",)


def capability_class(capability) -> int:
    """Table key for a ``(major, minor)`` compute capability; ``None`` (interpreter) maps to 80."""
    if capability is not None and capability[0] == 9:
        return 90
    return 80


def rope_attention_config(head_dim: int, dtype: torch.dtype, capability,
                          dot_precision: str = "ieee") -> RopeAttentionConfig:
    """The launch configuration for ``head_dim``, storage ``dtype``, ``(major, minor)`` capability (or None)
    and ``dot_precision`` (one of :func:`dot_precisions` of ``dtype``).

    Raises:
        ValueError: for a head dim, dtype or dot precision the kernels have no configuration for.
    """
    key = (head_dim, dtype, capability_class(capability), dot_precision)
    if key not in _TABLE:
        raise ValueError(f"RoPE attention kernels support head dims {HEAD_DIMS} in float16/bfloat16/float32 "
                         f"(dot precision 'ieee', or 'tf32' for float32); got head dim {head_dim} with {dtype} "
                         f"and {dot_precision!r}")
    return _TABLE[key]

"""Launch configurations of the RoPE flash-attention kernels: a plain table, no autotuning.

Keyed by head dim (32, 64, 128), storage dtype and compute-capability class: ``90`` for Hopper
(sm_90, 227 KB shared memory per block), ``80`` for everything else the kernels run on (A100's
sm_80 with 163 KB, but also sm_86/89 with ~99 KB, so the ``80`` entries stay under 99 KB; the
interpreter uses them too). The DUSt3R family runs N = 196..768 tokens with 12-16 heads, so
query blocks of 64 keep enough programs in flight (B*H*cdiv(N, 64)) for a GPU's SMs.

Tile sizes are powers of two >= 16 (``tl.dot`` minimum); M = 64 per warpgroup lets Hopper use
wgmma with 4 warps. fp32 runs the non-tensor-core (``ieee``) dot, whose operands take twice the
registers and shared memory, hence the smaller tiles and no software pipelining (1 stage).
"""
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

__all__ = ["KernelConfig", "RopeAttentionConfig", "HEAD_DIMS", "CAPABILITY_CLASSES", "K_ROTATIONS",
           "capability_class", "rope_attention_config"]

HEAD_DIMS = (32, 64, 128)
CAPABILITY_CLASSES = (80, 90)
#: How the keys get rotated: "in_loop" rotates each key tile inside the attention loop (every query
#: block redoes it); "pre_rotated" runs the RoPE kernel once to write rotated copies first.
K_ROTATIONS = ("in_loop", "pre_rotated")


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


def _entry(forward: KernelConfig, backward_dq: KernelConfig, backward_dkdv: KernelConfig,
           head_dim: int) -> RopeAttentionConfig:
    # RoPE kernel: 2048 elements per program (64 rows at Dh 32) keeps it under ~150 registers
    return RopeAttentionConfig(forward=forward, backward_dq=backward_dq, backward_dkdv=backward_dkdv,
                               rope_block=2048 // head_dim)


_TABLE: Dict[Tuple[int, torch.dtype, int], RopeAttentionConfig] = {}
for _cap in CAPABILITY_CLASSES:
    for _dtype in (torch.float16, torch.bfloat16):
        _TABLE[(32, _dtype, _cap)] = _entry(_HALF, _HALF, _HALF, 32)
        _TABLE[(64, _dtype, _cap)] = _entry(_HALF, _HALF, _HALF_DKDV, 64)
        _TABLE[(128, _dtype, _cap)] = _entry(_HALF_WIDE_HEAD, _HALF_WIDE_HEAD, _HALF_DKDV_WIDE_HEAD, 128)
    _TABLE[(32, torch.float32, _cap)] = _entry(_FP32, _FP32, _FP32_DKDV, 32)
    _TABLE[(64, torch.float32, _cap)] = _entry(_FP32, _FP32_BWD, _FP32_DKDV, 64)
    _TABLE[(128, torch.float32, _cap)] = _entry(_FP32_WIDE_HEAD, _FP32_WIDE_HEAD, _FP32_WIDE_HEAD, 128)


def capability_class(capability) -> int:
    """Table key for a ``(major, minor)`` compute capability; ``None`` (interpreter) maps to 80."""
    if capability is not None and capability[0] == 9:
        return 90
    return 80


def rope_attention_config(head_dim: int, dtype: torch.dtype, capability) -> RopeAttentionConfig:
    """The launch configuration for ``head_dim``, storage ``dtype`` and ``(major, minor)`` capability (or None).

    Raises:
        ValueError: for a head dim or dtype the kernels have no configuration for.
    """
    key = (head_dim, dtype, capability_class(capability))
    if key not in _TABLE:
        raise ValueError(f"RoPE attention kernels support head dims {HEAD_DIMS} in float16/bfloat16/float32; "
                         f"got head dim {head_dim} with {dtype}")
    return _TABLE[key]

"""Launch configurations of the RoPE flash-attention kernels: a plain table, no autotuning.

Keyed by (GPU class, head dim, storage dtype, dot precision): the class is
:func:`~fastpatch.kernels.gpu_classes.capability_class` of the device (80, 86, 90, 100, 120; the
interpreter runs the ``80`` rows), the head dim 32, 64 or 128, and the dot precision (see
:data:`DOT_PRECISIONS`) ``"ieee"``, or ``"tf32"`` for float32 when torch's TF32 switch is on.
:mod:`.patch_embed_configs` has the same shape. The DUSt3R family runs N = 196..768 tokens with
12-16 heads, so query blocks of 64 keep enough programs in flight (B*H*cdiv(N, 64)) for a GPU's SMs.

Tile sizes are powers of two >= 16 (``tl.dot`` minimum); M = 64 per warpgroup lets Hopper use
wgmma with 4 warps. IEEE fp32 runs the non-tensor-core (``ieee``) dot, whose operands take twice
the registers and shared memory, hence the smaller tiles and no software pipelining (1 stage).
TF32 fp32 (``tf32``: tensor cores, operands rounded to a 10-bit mantissa) keeps fp32 operands in
registers and shared memory too, so its entries take the half-precision tile shapes where they fit
(Dh 32/64; the forward and dQ with 2 stages, dK/dV with 1) and IEEE fp32's backward tiles at Dh 128,
within 99 KB. These TF32 tiles were chosen from the shared memory of the AOT compiles, not tuned on
a GPU.

The rows by class (every one AOT-compiled for its class by ``tests/aot/test_rope_attention_aot.py``;
``docs/gpu-classes.md``):

* ``80`` (A100, 163 KB) and ``90`` (Hopper, 227 KB): one set of tiles, :data:`_DATACENTER`, all under
  99 KB (they served sm_86/89 too before the consumer classes had rows). No entry has been timed on a
  GPU yet. Static evidence (CPU compiles, triton 3.7.1, ``bench/results/2026-11-27-static/``): on
  sm_90 every head-dim-64 fp16/bf16 entry compiles without register spills (the compile tests hold
  that); the IEEE-fp32 and TF32 backward entries and, on sm_80, the half-precision dK/dV entry spill
  (200 B per thread there; 32-row query tiles do not). sm_80 keeps it until an A100 times the
  alternatives (``bench/gpu_tune.sh``).
* ``100`` (B200, 227 KB, tcgen05 tensor cores): the same tiles; on sm_100 every head-dim-64 fp16/bf16
  kernel compiles to tcgen05 without spills.
* ``86`` (RTX 30xx/40xx) and ``120`` (RTX 50xx): 99 KB per block, mma.sync only, and the same 64K
  registers per SM: :data:`_CONSUMER`, the datacenter tiles except at head dim 64 in half precision,
  whose dQ and dK/dV kernels spill there (16-288 B per thread on sm_120) and take narrower key
  (dQ) and query (dK/dV) tiles that do not.

Tuning: ``bench/sweep_attention.py`` on a GPU (``bench/gpu_tune.sh``), then record the choice and its
results folder here.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .gpu_classes import CAPABILITY_CLASSES, capability_class

__all__ = ["KernelConfig", "RopeAttentionConfig", "HEAD_DIMS", "DTYPES", "CAPABILITY_CLASSES", "K_ROTATIONS",
           "DOT_PRECISIONS", "ROPE_ATTENTION_CONFIGS", "capability_class", "dot_precisions", "rope_attention_config"]

HEAD_DIMS = (32, 64, 128)
#: Storage dtypes the kernels take (other calls run the torch path).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
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
    """Everything the launchers choose for one (GPU class, head dim, dtype, dot precision)."""

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


def _rows(half_d64_dq: KernelConfig, half_d64_dkdv: KernelConfig) -> Dict[Tuple[int, torch.dtype, str],
                                                                             RopeAttentionConfig]:
    """One class's rows, (head dim, dtype, dot precision) -> config, given its head-dim-64 fp16/bf16 backward tiles."""
    rows = {}
    for dtype in (torch.float16, torch.bfloat16):
        rows[(32, dtype, "ieee")] = _entry(_HALF, _HALF, _HALF, 32)
        rows[(64, dtype, "ieee")] = _entry(_HALF, half_d64_dq, half_d64_dkdv, 64)
        rows[(128, dtype, "ieee")] = _entry(_HALF_WIDE_HEAD, _HALF_WIDE_HEAD, _HALF_DKDV_WIDE_HEAD, 128)
    rows[(32, torch.float32, "ieee")] = _entry(_FP32, _FP32, _FP32_DKDV, 32)
    rows[(64, torch.float32, "ieee")] = _entry(_FP32, _FP32_BWD, _FP32_DKDV, 64)
    rows[(128, torch.float32, "ieee")] = _entry(_FP32_WIDE_HEAD, _FP32_WIDE_HEAD, _FP32_WIDE_HEAD, 128)
    rows[(32, torch.float32, "tf32")] = _entry(_TF32, _TF32, _TF32_DKDV, 32)
    rows[(64, torch.float32, "tf32")] = _entry(_TF32, _TF32, _TF32_DKDV, 64)
    rows[(128, torch.float32, "tf32")] = _entry(_TF32_WIDE_HEAD, _FP32_WIDE_HEAD, _FP32_WIDE_HEAD, 128)
    return rows


#: sm_80, sm_90, sm_100: the tiles every datacenter class has run so far.
_DATACENTER = _rows(half_d64_dq=_HALF, half_d64_dkdv=_HALF_DKDV)
#: sm_86/89, sm_120: 99 KB, mma.sync; no spills at head dim 64 in half precision (module docstring).
_CONSUMER = _rows(half_d64_dq=_HALF_WIDE_HEAD, half_d64_dkdv=_HALF_DKDV_WIDE_HEAD)

#: (GPU class, head dim, storage dtype, dot precision) -> config.
ROPE_ATTENTION_CONFIGS: Dict[Tuple[int, int, torch.dtype, str], RopeAttentionConfig] = {
    (gpu_class, *key): config
    for gpu_class, rows in ((80, _DATACENTER), (86, _CONSUMER), (90, _DATACENTER), (100, _DATACENTER),
                            (120, _CONSUMER))
    for key, config in rows.items()
}


def dot_precisions(dtype: torch.dtype) -> Tuple[str, ...]:
    """The dot precisions the kernels run in for ``dtype``: both for float32, ``("ieee",)`` otherwise."""
    return DOT_PRECISIONS if dtype == torch.float32 else ("ieee",)


def rope_attention_config(head_dim: int, dtype: torch.dtype, capability: Optional[Tuple[int, int]],
                          dot_precision: str = "ieee") -> RopeAttentionConfig:
    """The launch configuration for ``head_dim``, storage ``dtype``, ``(major, minor)`` capability (or None:
    the interpreter) and ``dot_precision`` (one of :func:`dot_precisions` of ``dtype``).

    Raises:
        ValueError: for a head dim, dtype or dot precision the kernels have no configuration for.
    """
    key = (capability_class(capability), head_dim, dtype, dot_precision)
    if key not in ROPE_ATTENTION_CONFIGS:
        raise ValueError(f"RoPE attention kernels support head dims {HEAD_DIMS} in float16/bfloat16/float32 "
                         f"(dot precision 'ieee', or 'tf32' for float32); got head dim {head_dim} with {dtype} "
                         f"and {dot_precision!r}")
    return ROPE_ATTENTION_CONFIGS[key]

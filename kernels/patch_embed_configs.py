"""Launch configurations of the patch-embedding kernels: a plain table, no autotuning.

Same shape as :mod:`.rope_attention_configs`: keyed by (GPU class, then the op's own facts) --
here (GPU class, storage dtype, wide = embed_dim > 64) -- with the class from
:func:`~fastpatch.kernels.gpu_classes.capability_class` (80, 86, 90, 100, 120; the interpreter runs
the ``80`` rows). One entry serves the forward and both backward kernels; the dot precision (IEEE
or TF32 fp32) does not change it.

At DUSt3R's size (batch 8 of 512x384: M = 6144, K = 768, E = 1024) the GEMM does ~410 FLOP per byte
it must move, just over an H100's ridge point (~270 for bf16): mildly compute-bound, a few
microseconds either way (bench/GPU_NOTES.md). fp32 keeps smaller tiles (its products run on IEEE
FMA, or on TF32 tensor cores when cuDNN's TF32 switch is on). Not timed on a GPU yet.

The rows by class (every one AOT-compiled for its class by ``tests/aot/test_patch_embed_aot.py``;
``docs/gpu-classes.md``):

* ``80`` (A100), ``86`` (RTX 30xx/40xx) and ``120`` (RTX 50xx): :data:`_MMA_SYNC_TILES`, 32-deep
  K tiles: under 99 KB, and the forward compiles without register spills on all three. (The
  Hopper tiles below compile to 255 registers and 64 B of spills per thread in the bf16/fp16
  forward on sm_120, which got them before it had a class of its own.)
* ``90`` (Hopper) and ``100`` (B200): :data:`_LARGE_SMEM_TILES`, 64-deep K tiles for wgmma / tcgen05
  (227 KB per block); the forward compiles without spills on both. Static evidence on sm_90 (CPU
  compiles, bench/results/2026-11-27-static/): the half-precision backward kernels spill 40-112 B per
  thread (they share the forward's config).

Tuning: bench/sweep_patch_embed.py on a GPU (bench/gpu_tune.sh).
"""
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from .gpu_classes import CAPABILITY_CLASSES, capability_class

__all__ = ["PatchEmbedConfig", "DTYPES", "CAPABILITY_CLASSES", "PATCH_EMBED_CONFIGS", "capability_class",
           "patch_embed_config"]

#: Storage dtypes the kernels take (float64 runs the torch path).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class PatchEmbedConfig(NamedTuple):
    """Block sizes and launch options shared by the three patch-embedding kernels.

    ``block_m`` tiles tokens, ``block_n`` embedding channels, ``block_k`` patch pixels.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _rows(half_narrow: PatchEmbedConfig, half_wide: PatchEmbedConfig) -> Dict[Tuple[torch.dtype, bool],
                                                                             PatchEmbedConfig]:
    """One class's rows, (dtype, wide) -> config, given its fp16/bf16 tiles (fp32 has one set everywhere)."""
    rows = {}
    for wide in (False, True):
        rows[(torch.float32, wide)] = PatchEmbedConfig(64, 64, 32, 4, 3)
        for dtype in (torch.float16, torch.bfloat16):
            rows[(dtype, wide)] = half_wide if wide else half_narrow
    return rows


#: sm_80, sm_86/89, sm_120: 99 KB per block at most, mma.sync tensor cores.
_MMA_SYNC_TILES = _rows(half_narrow=PatchEmbedConfig(128, 64, 32, 4, 3), half_wide=PatchEmbedConfig(128, 128, 32, 8, 3))
#: sm_90, sm_100: 227 KB per block, wgmma / tcgen05 tensor cores.
_LARGE_SMEM_TILES = _rows(half_narrow=PatchEmbedConfig(128, 64, 64, 4, 3),
                          half_wide=PatchEmbedConfig(128, 128, 64, 8, 3))

#: (GPU class, storage dtype, wide = embed_dim > 64) -> config.
PATCH_EMBED_CONFIGS: Dict[Tuple[int, torch.dtype, bool], PatchEmbedConfig] = {
    (gpu_class, *key): config
    for gpu_class, rows in ((80, _MMA_SYNC_TILES), (86, _MMA_SYNC_TILES), (90, _LARGE_SMEM_TILES),
                            (100, _LARGE_SMEM_TILES), (120, _MMA_SYNC_TILES))
    for key, config in rows.items()
}


def patch_embed_config(embed_dim: int, dtype: torch.dtype, capability: Optional[Tuple[int, int]]) -> PatchEmbedConfig:
    """The launch configuration for ``embed_dim`` output channels in storage ``dtype`` on a GPU of
    ``(major, minor)`` compute capability (None: the interpreter).

    Raises:
        ValueError: a dtype the kernels have no configuration for.
    """
    key = (capability_class(capability), dtype, embed_dim > 64)
    if key not in PATCH_EMBED_CONFIGS:
        raise ValueError(f"the patch-embedding kernels support float32/float16/bfloat16, got {dtype}")
    return PATCH_EMBED_CONFIGS[key]

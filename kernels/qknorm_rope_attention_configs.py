"""Launch configurations of the qk-norm + RoPE2D flash-attention kernels: a plain table, no autotuning.

Same shape as :mod:`fastpatch.kernels.rope_attention_configs` (keyed by head dim, storage dtype,
capability class 80/90 and dot precision) and, until GPU tuning, the same tile sizes as its entries:
the attention main loops are the same (the LayerNorm + RoPE prologue touches only the query tile
once, and keys arrive pre-normalised and pre-rotated), so the register and shared-memory budget of
the loop is unchanged. The prologue adds (BLOCK, Dh) fp32 live values for the LayerNorm statistics
only before the loop. ``prepass_block``: rows per program of the K (and, in the backward, Q)
LayerNorm + RoPE pre-pass kernel (2048 elements per program, as the RoPE kernel).

No entry has been timed on a GPU.
"""
from dataclasses import dataclass
from typing import Tuple

import torch

from .rope_attention_configs import (
    CAPABILITY_CLASSES,
    DOT_PRECISIONS,
    HEAD_DIMS,
    KernelConfig,
    capability_class,
    dot_precisions,
    rope_attention_config,
)

__all__ = ["QKNormRopeAttentionConfig", "HEAD_DIMS", "CAPABILITY_CLASSES", "DOT_PRECISIONS", "dot_precisions",
           "qknorm_rope_attention_config", "KernelConfig", "capability_class"]


@dataclass(frozen=True)
class QKNormRopeAttentionConfig:
    """Everything the launchers choose for one (head dim, dtype, capability class, dot precision)."""

    forward: KernelConfig
    backward_dq: KernelConfig
    backward_dkdv: KernelConfig
    prepass_block: int


def qknorm_rope_attention_config(head_dim: int, dtype: torch.dtype, capability: Tuple[int, int] = None,
                                 dot_precision: str = "ieee") -> QKNormRopeAttentionConfig:
    """The configuration for ``head_dim`` (32/64/128), storage ``dtype``, ``(major, minor)`` capability
    (None: interpreter, the sm_80 entry) and ``dot_precision``.

    Raises:
        ValueError: a head dim, dtype or dot precision without an entry.
    """
    base = rope_attention_config(head_dim, dtype, capability, dot_precision)
    return QKNormRopeAttentionConfig(forward=base.forward, backward_dq=base.backward_dq,
                                     backward_dkdv=base.backward_dkdv, prepass_block=2048 // head_dim)

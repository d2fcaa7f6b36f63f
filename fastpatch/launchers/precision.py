"""``tl.dot`` input precision for float32 launches: TF32 exactly where torch's own op would use it.

* RoPE attention replaces fp32 matmuls: it follows ``torch.backends.cuda.matmul`` (``allow_tf32``,
  i.e. ``torch.get_float32_matmul_precision() != "highest"``).
* The patch embedding replaces a convolution: it follows ``torch.backends.cudnn`` (``allow_tf32``).

float16/bfloat16 always get ``"ieee"`` (the switches do not apply to them). Both switches are read at
each call (users toggle them). Since torch 2.9 each also has a per-operator setting
(``fp32_precision``); once a program uses it, the legacy ``allow_tf32`` getter may raise, and the
per-operator setting is asked instead.
"""
from __future__ import annotations

import torch

__all__ = ["matmul_dot_precision", "conv_dot_precision"]


def _uses_tf32(backend, operator) -> bool:
    """``backend.allow_tf32``, or ``operator.fp32_precision == "tf32"`` where torch refuses the legacy getter."""
    try:
        return bool(backend.allow_tf32)
    except RuntimeError:  # torch >= 2.9, legacy and per-operator settings mixed
        return operator.fp32_precision == "tf32"


def matmul_dot_precision(dtype: torch.dtype) -> str:
    """"tf32" for float32 when torch's fp32 CUDA matmuls use TF32, else "ieee"."""
    matmul = torch.backends.cuda.matmul
    return "tf32" if dtype == torch.float32 and _uses_tf32(matmul, matmul) else "ieee"


def conv_dot_precision(dtype: torch.dtype) -> str:
    """"tf32" for float32 when torch's fp32 cuDNN convolutions use TF32, else "ieee"."""
    cudnn = torch.backends.cudnn
    return "tf32" if dtype == torch.float32 and _uses_tf32(cudnn, cudnn.conv) else "ieee"

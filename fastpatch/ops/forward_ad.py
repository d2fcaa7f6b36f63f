"""Forward-mode AD (dual tensors) and the Triton path.

The Triton custom ops have no forward-AD formula, and a custom op without one drops input tangents
silently (no error, no tangent on the output). Calls whose inputs carry tangents therefore run on
the torch path, which either differentiates them (the patch embedding's ``conv2d``) or refuses them
loudly (the attention's RoPE function has no ``jvp``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd import forward_ad

__all__ = ["carries_tangents"]


def carries_tangents(*tensors: Optional[torch.Tensor]) -> bool:
    """True inside ``torch.autograd.forward_ad.dual_level()`` when one of ``tensors`` (None entries
    ignored) has a tangent; a single global read outside a dual level."""
    if getattr(forward_ad, "_current_level", -1) < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)

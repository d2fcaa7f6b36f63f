"""Checks that a child module computes exactly what a fused forward assumes, so it may be bypassed.

A fused forward (:class:`fastpatch.modules.blocks.Block`'s MLP with its GELU and residual in the
GEMM, :class:`fastpatch.modules.attention.Attention`'s qkv projection) reads a child's parameters
instead of calling it. That is only the same computation when the child is exactly the class it
assumes, called the plain way: no forward/backward hooks on it (nor global module hooks), no
``forward`` overridden on the instance, no parametrization (which changes the class). Anything else
makes the caller call its children as modules, as upstream does.
"""
from __future__ import annotations

from typing import Dict

from torch import nn

from .. import reference

__all__ = ["is_plain", "plain_linear", "inactive_dropout", "plain_identity", "plain_gelu", "plain_mlp",
           "KNOWN_MLP_FORWARDS"]

_GLOBAL_HOOKS = tuple(getattr(nn.modules.module, name, {}) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))

# Fingerprints (fastpatch.patching.fingerprint: a hash of the syntax tree) of upstream Mlp.forward
# versions that compute fc1 -> act -> drop1 -> fc2 -> drop2 and nothing else.
KNOWN_MLP_FORWARDS = {
    "c2ea1aba0c03ac2b": "naver/croco d7de070 models/blocks.py Mlp.forward (dust3r main's croco; mini-dust3r 0.1.2)",
}

_MLP_CLASSES: Dict[type, bool] = {}  # Mlp class -> whether its forward is a known upstream one


def is_plain(module: object, cls: type) -> bool:
    """``module`` is exactly a ``cls`` (not a subclass), with no hooks and no instance ``forward``."""
    if type(module) is not cls:
        return False
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks \
            or module._backward_pre_hooks or "forward" in module.__dict__:
        return False
    return not any(_GLOBAL_HOOKS)


def plain_linear(module: object) -> bool:
    """A plain ``nn.Linear``: ``F.linear(x, module.weight, module.bias)`` is its forward."""
    return is_plain(module, nn.Linear)


def inactive_dropout(module: object) -> bool:
    """A plain ``nn.Dropout`` that is the identity now: ``p == 0`` or not training."""
    return is_plain(module, nn.Dropout) and (module.p == 0.0 or not module.training)


def plain_identity(module: object) -> bool:
    """A plain ``nn.Identity`` (what upstream's blocks hold as ``drop_path`` when its rate is 0)."""
    return is_plain(module, nn.Identity)


def plain_gelu(module: object) -> bool:
    """A plain ``nn.GELU(approximate="none")``: the exact erf GELU."""
    return is_plain(module, nn.GELU) and module.approximate == "none"


def _known_mlp_class(cls: type) -> bool:
    """``cls`` is :class:`fastpatch.reference.Mlp` or its ``forward`` is a known upstream one (cached)."""
    known = _MLP_CLASSES.get(cls)
    if known is None:
        known = cls is reference.Mlp
        if not known:
            from .. import patching  # imported here: patching imports the modules, not the other way

            fingerprint = getattr(patching, "fingerprint", None)
            known = fingerprint is not None and fingerprint(getattr(cls, "forward", None)) in KNOWN_MLP_FORWARDS
        _MLP_CLASSES[cls] = known
    return known


def plain_mlp(mlp: object) -> bool:
    """``mlp(x)`` is ``fc2(gelu(fc1(x)))``: a known Mlp class (:func:`_known_mlp_class`) with no hooks,
    exactly the children ``fc1, act, drop1, fc2, drop2``, plain ``nn.Linear`` layers, an exact GELU
    and inactive dropouts."""
    if not isinstance(mlp, nn.Module) or not _known_mlp_class(type(mlp)) or not is_plain(mlp, type(mlp)):
        return False
    if tuple(mlp._modules) != ("fc1", "act", "drop1", "fc2", "drop2") or mlp._parameters or mlp._buffers:
        return False
    return (plain_linear(mlp.fc1) and plain_gelu(mlp.act) and inactive_dropout(mlp.drop1)
            and plain_linear(mlp.fc2) and inactive_dropout(mlp.drop2))

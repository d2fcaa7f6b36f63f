"""Checks that a child module computes exactly what a fused forward assumes, so it may be bypassed.

A fused forward (:class:`fastpatch.modules.blocks.Block`'s MLP with its GELU and residual in the
GEMM, :class:`fastpatch.modules.attention.Attention`'s qkv projection) reads a child's parameters
instead of calling it. That is only the same computation when the child is exactly the class it
assumes, called the plain way: no forward/backward hooks on it (nor global module hooks), no
``forward`` overridden on the instance, no parametrization (which changes the class). Anything else
makes the caller call its children as modules, as upstream does. The one hook allowed is
``patch_model(backend=...)``'s pin, when the backend it pins is already in force (the fused parent runs
under its own, identical pin).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from torch import nn

from .. import reference
from ..backend import pins_in_force

__all__ = ["is_plain", "plain_linear", "inactive_dropout", "plain_identity", "plain_gelu", "plain_mlp",
           "known_layer_scale_class", "KNOWN_MLP_FORWARDS", "KNOWN_LAYER_SCALE_FORWARDS"]

_GLOBAL_HOOKS = tuple(getattr(nn.modules.module, name, {}) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))

_CROCO_MLP_CHILDREN = ("fc1", "act", "drop1", "fc2", "drop2")  # fc1 -> act -> drop1 -> fc2 -> drop2
_DINOV2_MLP_CHILDREN = ("fc1", "act", "fc2", "drop")  # fc1 -> act -> drop -> fc2 -> drop

# Fingerprints (fastpatch.patching.fingerprint: a hash of the syntax tree) of upstream Mlp.forward
# versions that compute fc1 -> act -> dropout -> fc2 -> dropout and nothing else: where each comes from,
# and the children its class holds (in registration order).
KNOWN_MLP_FORWARDS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "c2ea1aba0c03ac2b": ("naver/croco d7de070 models/blocks.py Mlp.forward (dust3r main's croco; mini-dust3r "
                         "0.1.2)", _CROCO_MLP_CHILDREN),
    "8d7e58d42b4d1f34": ("DINOv2's Mlp.forward as VGGT (facebookresearch/vggt vggt/layers/mlp.py, read in a fork "
                         "that merged it in 2025-11) and yyfz/Pi3 9fa3ddb pi3/models/dinov2/layers/mlp.py carry it",
                         _DINOV2_MLP_CHILDREN),
}

# Fingerprints of LayerScale.forward versions computing ``x.mul_(gamma) if inplace else x * gamma``.
KNOWN_LAYER_SCALE_FORWARDS: Dict[str, str] = {
    "7ab0b44253cd2fb1": "DINOv2's LayerScale.forward as VGGT (vggt/layers/layer_scale.py) and yyfz/Pi3 9fa3ddb "
                        "(pi3/models/dinov2/layers/layer_scale.py) carry it",
}

_MLP_CHILDREN: Dict[type, Optional[Tuple[str, ...]]] = {}  # Mlp class -> its known children layout, or None
_LAYER_SCALE_CLASSES: Dict[type, bool] = {}  # LayerScale class -> whether its forward is a known one


def is_plain(module: object, cls: type) -> bool:
    """``module`` is exactly a ``cls`` (not a subclass), with no instance ``forward`` and no hooks but
    ``patch_model(backend=...)``'s pin of the backend already in force (:func:`fastpatch.backend.pins_in_force`)."""
    if type(module) is not cls or "forward" in module.__dict__:
        return False
    return pins_in_force(module) and not any(_GLOBAL_HOOKS)


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


def _forward_fingerprint(cls: type) -> Optional[str]:
    """The fingerprint of ``cls.forward`` (None without the patching package)."""
    from .. import patching  # imported here: patching imports the modules, not the other way

    fingerprint = getattr(patching, "fingerprint", None)
    return None if fingerprint is None else fingerprint(getattr(cls, "forward", None))


def _known_mlp_children(cls: type) -> Optional[Tuple[str, ...]]:
    """The children layout of ``cls`` when it is :class:`fastpatch.reference.Mlp` or its ``forward`` is a
    known upstream one (:data:`KNOWN_MLP_FORWARDS`), else None (cached per class)."""
    if cls not in _MLP_CHILDREN:
        if cls is reference.Mlp:
            _MLP_CHILDREN[cls] = _CROCO_MLP_CHILDREN
        else:
            known = KNOWN_MLP_FORWARDS.get(_forward_fingerprint(cls))
            _MLP_CHILDREN[cls] = known[1] if known else None
    return _MLP_CHILDREN[cls]


def plain_mlp(mlp: object) -> bool:
    """``mlp(x)`` is ``fc2(gelu(fc1(x)))``: a known Mlp class (croco's ``fc1, act, drop1, fc2, drop2`` or
    DINOv2's ``fc1, act, fc2, drop``: :data:`KNOWN_MLP_FORWARDS`) with no hooks, exactly its children,
    plain ``nn.Linear`` layers, an exact GELU and inactive dropouts."""
    if not isinstance(mlp, nn.Module) or not is_plain(mlp, type(mlp)):
        return False
    children = _known_mlp_children(type(mlp))
    if children is None or tuple(mlp._modules) != children or mlp._parameters or mlp._buffers:
        return False
    dropouts = [name for name in children if name.startswith("drop")]
    return (plain_linear(mlp.fc1) and plain_gelu(mlp.act) and plain_linear(mlp.fc2)
            and all(inactive_dropout(getattr(mlp, name)) for name in dropouts))


def known_layer_scale_class(cls: type) -> bool:
    """``cls.forward`` is a known LayerScale forward (:data:`KNOWN_LAYER_SCALE_FORWARDS`; cached per class)."""
    if cls not in _LAYER_SCALE_CLASSES:
        _LAYER_SCALE_CLASSES[cls] = _forward_fingerprint(cls) in KNOWN_LAYER_SCALE_FORWARDS
    return _LAYER_SCALE_CLASSES[cls]

"""patch_dust3r / unpatch_dust3r: rebind upstream class names before models are built."""
from __future__ import annotations

import inspect
import logging
import sys
from typing import Dict, Iterable, List, Optional, Tuple

from torch import nn

from .forward_code import forward_code
from .recognise import code_reason, fastpatch_classes, known_ignored_attributes, trusted_roles
from .roles import ROLES

__all__ = ["patch_dust3r", "unpatch_dust3r"]

logger = logging.getLogger("fastpatch")

# Class name -> the constructor arguments an upstream class of that name must take. Block and
# DecoderBlock are not rebound: their forward is plain torch either way, and upstream's __init__
# builds its attention by looking up the (rebound) names Attention / CrossAttention in its own
# module, so the attention inside is fastpatch's anyway. Rebinding them would also swap whatever
# Mlp, DropPath or attention class a fork's module builds for fastpatch's.
_CLASS_SIGNATURES: Dict[str, Tuple[str, ...]] = {
    "PatchEmbedDust3R": ("img_size", "patch_size", "in_chans", "embed_dim"),
    "ManyAR_PatchEmbed": ("img_size", "patch_size", "in_chans", "embed_dim"),
    "RoPE2D": ("freq", "F0"),
    "Attention": ("dim", "rope", "num_heads", "qkv_bias"),
    "CrossAttention": ("dim", "rope", "num_heads", "qkv_bias"),
}

# (module object, attribute name, original class) for each rebinding made by patch_dust3r.
_class_patches: List[Tuple[object, str, type]] = []


def _constructor_takes(cls: type, *names: str) -> bool:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return all(n in params for n in names)


def _is_fastpatch_module(name: str) -> bool:
    return name == "fastpatch" or name.startswith("fastpatch.")


def _replacement_class(original: type, name: str, trusted: bool) -> type:
    """fastpatch's class for ``name``, or a subclass of it whose class-level ``ignored_attributes`` say
    what ``original``'s forward ignores (croco's SDPA attention: ``scale``, ``attn_drop``; croco's
    torch RoPE2D before 2f3d5d5: ``F0``), so instances built from it compute what ``original``'s would."""
    cls = fastpatch_classes()[name]
    role = ROLES[name]
    if trusted or not role.may_ignore:
        return cls
    ignored = (role.may_ignore - forward_code(original, role.entry).reads) | known_ignored_attributes(original, role)
    if not ignored:
        return cls
    return type(cls.__name__, (cls,), {"ignored_attributes": frozenset(ignored), "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def _upstream_class(module: object, name: str, trusted: Dict[type, str]) -> Tuple[Optional[type], Optional[str]]:
    """(the upstream class bound to ``name`` in ``module``, None) or (None, why it is not rebound, if worth saying).

    Rebinding needs known code, ``__init__`` included: construction is replaced too.
    """
    value = module.__dict__.get(name) if hasattr(module, "__dict__") else None
    if not isinstance(value, type) or not issubclass(value, nn.Module) or value.__name__ != name:
        return None, None
    if _is_fastpatch_module(value.__module__) or not _constructor_takes(value, *_CLASS_SIGNATURES[name]):
        return None, None
    reason = None if value in trusted else code_reason(value, name, with_init=True)
    return (value, None) if reason is None else (None, reason)


def patch_dust3r(*, trust: Iterable[type] = ()) -> List[str]:
    """Rebind DUSt3R-family classes in every already-imported upstream module to fastpatch's.

    Scans ``sys.modules`` for module-level names ``PatchEmbedDust3R``, ``ManyAR_PatchEmbed``,
    ``RoPE2D``, ``Attention`` and ``CrossAttention`` bound to classes with upstream's constructor
    arguments (e.g. ``Attention`` must take ``rope``, so timm's is not touched) whose code is a
    known upstream version, ``__init__`` included (a fork keeps its name: build the model and use
    :func:`~fastpatch.patch_model`, which can verify it by probe). What a known version ignores
    (croco's SDPA attention: ``scale``, ``attn_drop``) goes into a subclass of fastpatch's class
    bound under the same name. Models constructed
    afterwards (``from_pretrained``, ``load_model``) build fastpatch modules; upstream's ``Block``
    and ``DecoderBlock`` stay, holding fastpatch attention. Import the upstream model code first.
    Idempotent. Names left alone are logged at INFO level with the reason.

    Args:
        trust: classes to rebind even though their code is not known upstream code (you know they
            build and compute what upstream's class does); see :func:`~fastpatch.patch_model`.

    Returns:
        ``"module.Name"`` for each rebinding made.
    """
    trusted = trusted_roles(trust)
    done, skipped = [], []
    for module_name, module in list(sys.modules.items()):
        if module is None or _is_fastpatch_module(module_name):
            continue
        for name in _CLASS_SIGNATURES:
            original, reason = _upstream_class(module, name, trusted)
            if original is not None:
                _class_patches.append((module, name, original))
                setattr(module, name, _replacement_class(original, name, original in trusted))
                done.append(f"{module_name}.{name}")
            elif reason is not None:
                skipped.append(f"{module_name}.{name} ({reason})")
    if done:
        logger.info("fastpatch rebound %d upstream classes: %s", len(done), ", ".join(done))
    if skipped:
        logger.info("fastpatch left %d classes alone: %s", len(skipped), "; ".join(skipped))
    return done


def unpatch_dust3r() -> None:
    """Undo every :func:`patch_dust3r` rebinding (models already built keep their modules)."""
    while _class_patches:
        module, name, original = _class_patches.pop()
        setattr(module, name, original)

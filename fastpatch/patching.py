"""Swap fastpatch's modules into DUSt3R / MASt3R / CroCo models, and back.

Two ways in, after Liger-Kernel's ``apply_*`` functions:

* :func:`patch_model` walks an already-built model and replaces every upstream
  ``PatchEmbedDust3R``, ``ManyAR_PatchEmbed``, ``Attention``, ``CrossAttention``, ``Block``,
  ``DecoderBlock`` and the shared ``RoPE2D`` with fastpatch's class. The replacement
  *adopts* the original's state: the very same ``Parameter`` objects, buffers, child modules,
  device, dtype and train/eval mode (no copy, so optimizer state stays valid and the
  ``state_dict`` is unchanged). :func:`unpatch_model` puts the original objects back.
* :func:`patch_dust3r` rebinds those class names inside the upstream Python modules that are
  already imported, so models built or loaded afterwards get fastpatch modules;
  :func:`unpatch_dust3r` restores them.

Upstream classes are recognised by class name *and* structure (the attributes fastpatch's
``forward`` reads), wherever they were imported from: naver/dust3r's ``models.blocks``,
mini-dust3r's copy, mast3r, or a user's fork. dust3r itself is never imported here. Anything not
recognised is left alone and listed in the :class:`PatchReport`.
"""
from __future__ import annotations

import copy
import inspect
import logging
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from .backend import BACKENDS, reset_backend_override, set_backend_override

__all__ = ["PatchReport", "patch_model", "unpatch_model", "patch_dust3r", "unpatch_dust3r", "is_patched"]

logger = logging.getLogger("fastpatch")

# The attribute under which a fastpatch module keeps the upstream module it replaced. Stored in
# ``__dict__`` directly so it is neither a child module nor part of the state_dict.
_ORIGINAL = "_fastpatch_original"


def _has(module: nn.Module, *names: str) -> bool:
    return all(hasattr(module, n) for n in names)


def _linear(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _is_patch_embed(m: nn.Module) -> bool:
    proj = getattr(m, "proj", None)
    return (isinstance(proj, nn.Conv2d) and tuple(proj.kernel_size) == tuple(proj.stride)
            and proj.padding in ((0, 0), 0, "valid") and proj.dilation == (1, 1) and proj.groups == 1
            and _has(m, "patch_size", "norm", "flatten"))


def _is_rope(m: nn.Module) -> bool:
    return isinstance(getattr(m, "base", None), (int, float)) and isinstance(getattr(m, "F0", None), (int, float))


def _is_attention(m: nn.Module) -> bool:
    return _linear(m, "qkv", "proj") and _has(m, "num_heads", "rope", "attn_drop", "proj_drop")


def _is_cross_attention(m: nn.Module) -> bool:
    return _linear(m, "projq", "projk", "projv", "proj") and _has(m, "num_heads", "rope", "attn_drop", "proj_drop")


def _is_block(m: nn.Module) -> bool:
    return _has(m, "norm1", "attn", "norm2", "mlp", "drop_path")


def _is_decoder_block(m: nn.Module) -> bool:
    return _has(m, "norm1", "attn", "cross_attn", "norm2", "norm3", "mlp", "norm_y", "drop_path")


# Upstream class name -> structural check of an instance. The fastpatch class of the same name
# (exported at the package top level) replaces it.
_RECOGNISED: Dict[str, Callable[[nn.Module], bool]] = {
    "PatchEmbedDust3R": _is_patch_embed,
    "ManyAR_PatchEmbed": _is_patch_embed,
    "RoPE2D": _is_rope,
    "cuRoPE2D": _is_rope,
    "Attention": _is_attention,
    "CrossAttention": _is_cross_attention,
    "Block": _is_block,
    "DecoderBlock": _is_decoder_block,
}


def _fastpatch_classes() -> Dict[str, type]:
    import fastpatch

    names = {name: name for name in _RECOGNISED}
    names["cuRoPE2D"] = "RoPE2D"  # upstream's CUDA RoPE extension class
    return {upstream: getattr(fastpatch, ours) for upstream, ours in names.items()}


def _is_fastpatch(module: nn.Module) -> bool:
    return type(module).__module__.startswith("fastpatch.") and not type(module).__module__.startswith(
        "fastpatch.reference")


@dataclass
class PatchReport:
    """What :func:`patch_model` did: module paths replaced, per class, and those left alone."""

    replaced: Dict[str, List[str]] = field(default_factory=dict)
    left_alone: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def num_replaced(self) -> int:
        return sum(len(paths) for paths in self.replaced.values())

    def __str__(self) -> str:
        counts = ", ".join(f"{len(p)} {name}" for name, p in sorted(self.replaced.items())) or "nothing"
        text = f"fastpatch replaced {counts}"
        if self.left_alone:
            text += f"; left alone {len(self.left_alone)}: " + ", ".join(f"{p} ({r})" for p, r in self.left_alone)
        return text


class _BackendScope:
    """Forward pre/post hooks that run a module's forward under ``use_backend(backend)``.

    A per-thread stack of override tokens makes nested and re-entrant calls safe; the post hook is
    registered with ``always_call=True`` so an exception in forward still restores the choice (and
    does nothing when an earlier pre hook raised before ``enter`` ran). Only a plain
    ``threading.local`` read and list mutation: ``torch.compile`` traces both hooks without graph breaks.
    """

    def __init__(self, backend: str):
        self.backend = backend
        self.local = threading.local()

    def _tokens(self) -> List[int]:
        tokens = getattr(self.local, "tokens", None)
        if tokens is None:
            tokens = self.local.tokens = []
        return tokens

    def enter(self, module, args) -> None:
        self._tokens().append(set_backend_override(self.backend))

    def exit(self, module, args, output) -> None:
        tokens = self._tokens()
        if tokens:
            reset_backend_override(tokens.pop())

    def __getstate__(self) -> dict:
        return {"backend": self.backend}  # the per-thread tokens are transient (and threading.local does not pickle)

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["backend"])


def _adopt(original: nn.Module, cls: type, backend: str) -> nn.Module:
    """A ``cls`` instance sharing ``original``'s parameters, buffers, children and attributes.

    The module-level dicts (``_parameters``, ``_modules``, hooks...) are copied shallowly so the
    new module can later hold replaced children while the original keeps its own; the tensors
    and child objects inside them are shared, not copied.
    """
    new = cls.__new__(cls)
    for key, value in original.__dict__.items():
        new.__dict__[key] = copy.copy(value) if isinstance(value, dict) else value
    new.__dict__[_ORIGINAL] = original
    if backend != "auto":
        scope = _BackendScope(backend)
        new.register_forward_pre_hook(scope.enter)
        new.register_forward_hook(scope.exit, always_call=True)
    return new


def is_patched(model: nn.Module) -> bool:
    """True if ``model`` or any submodule is a fastpatch replacement made by :func:`patch_model`."""
    return any(_ORIGINAL in m.__dict__ for m in model.modules())


def patch_model(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replace the upstream DUSt3R-family modules inside ``model`` with fastpatch's, in place.

    Args:
        model: a built model (e.g. ``AsymmetricCroCo3DStereo.from_pretrained(...)``, a MASt3R model,
            :class:`fastpatch.reference.Dust3RBackbone`, or a single block).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``: the backend the replaced modules use
            (see :mod:`fastpatch.backend`); ``"auto"`` follows the global choice at each call,
            anything else pins it with forward hooks on each replaced module.

    Returns:
        The patched model: ``model`` itself, unless ``model`` is itself a recognised module, in which
        case its replacement. Parameters are shared, never copied; patching twice is a no-op.
        ``model.fastpatch_report`` (a :class:`PatchReport`) says what was replaced; the same summary
        is logged at INFO level on the ``fastpatch`` logger.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {', '.join(BACKENDS)}")
    classes = _fastpatch_classes()
    report = PatchReport()
    replacements: Dict[int, nn.Module] = {}  # id(original) -> replacement: shared modules stay shared

    def replacement(module: nn.Module, path: str) -> nn.Module:
        if id(module) in replacements:
            return replacements[id(module)]
        name = type(module).__name__
        new = module
        if name in _RECOGNISED and not _is_fastpatch(module):
            if _RECOGNISED[name](module):
                new = _adopt(module, classes[name], backend)
                report.replaced.setdefault(name, []).append(path or "<root>")
            else:
                report.left_alone.append((path or "<root>", f"{name} without the expected attributes"))
        replacements[id(module)] = new
        visit(new, path)
        return new

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent._modules.items()):
            if child is not None:
                parent._modules[child_name] = replacement(child, f"{prefix}.{child_name}" if prefix else child_name)

    patched = replacement(model, "")
    patched.__dict__["fastpatch_report"] = report
    logger.info("%s", report)
    return patched


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`: put every original module object back, with the current state.

    Parameters and buffers that were re-assigned while patched (e.g. by ``.to()`` with
    ``torch.__future__.set_overwrite_module_params_on_conversion(True)``), child modules and the
    train/eval flag are carried back to the originals. Returns the unpatched model (``model``,
    or the original object if ``model`` itself was a replacement).
    """
    restored: Dict[int, nn.Module] = {}

    def restore(module: nn.Module) -> nn.Module:
        if id(module) in restored:
            return restored[id(module)]
        for child_name, child in list(module._modules.items()):
            if child is not None:
                module._modules[child_name] = restore(child)
        original = module.__dict__.get(_ORIGINAL)
        result = module
        if original is not None:
            original._parameters.update(module._parameters)
            original._buffers.update(module._buffers)
            original._modules.update(module._modules)
            original.training = module.training
            result = original
        restored[id(module)] = result
        return result

    result = restore(model)
    model.__dict__.pop("fastpatch_report", None)
    result.__dict__.pop("fastpatch_report", None)
    return result


# ----------------------------------------------------------------------------------------------
# Class-level patching (before construction)
# ----------------------------------------------------------------------------------------------
def _constructor_takes(cls: type, *names: str) -> bool:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return all(n in params for n in names)


# Class name -> the constructor arguments an upstream class of that name must take.
_CLASS_SIGNATURES: Dict[str, Tuple[str, ...]] = {
    "PatchEmbedDust3R": ("img_size", "patch_size", "in_chans", "embed_dim"),
    "ManyAR_PatchEmbed": ("img_size", "patch_size", "in_chans", "embed_dim"),
    "RoPE2D": ("freq", "F0"),
    "Attention": ("dim", "rope", "num_heads", "qkv_bias"),
    "CrossAttention": ("dim", "rope", "num_heads", "qkv_bias"),
    "Block": ("dim", "num_heads", "rope"),
    "DecoderBlock": ("dim", "num_heads", "norm_mem", "rope"),
}

# (module object, attribute name, original class) for each rebinding made by patch_dust3r.
_class_patches: List[Tuple[object, str, type]] = []


def _upstream_class(module: object, name: str) -> Optional[type]:
    value = module.__dict__.get(name) if hasattr(module, "__dict__") else None
    if not isinstance(value, type) or not issubclass(value, nn.Module) or value.__name__ != name:
        return None
    if value.__module__.startswith("fastpatch"):
        return None
    return value if _constructor_takes(value, *_CLASS_SIGNATURES[name]) else None


def patch_dust3r() -> List[str]:
    """Rebind DUSt3R-family classes in every already-imported upstream module to fastpatch's.

    Scans ``sys.modules`` for module-level names ``PatchEmbedDust3R``, ``ManyAR_PatchEmbed``,
    ``RoPE2D``, ``Attention``, ``CrossAttention``, ``Block``, ``DecoderBlock`` bound to classes
    with upstream's constructor arguments (e.g. ``Block`` must take ``rope``, so timm's ``Block``
    is not touched). Models constructed afterwards — ``from_pretrained``, ``load_model`` —
    build fastpatch modules. Import the upstream model code first. Idempotent.

    Returns:
        ``"module.Name"`` for each rebinding made.
    """
    classes = _fastpatch_classes()
    done = []
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.startswith("fastpatch"):
            continue
        for name in _CLASS_SIGNATURES:
            original = _upstream_class(module, name)
            if original is not None:
                _class_patches.append((module, name, original))
                setattr(module, name, classes[name])
                done.append(f"{module_name}.{name}")
    if done:
        logger.info("fastpatch rebound %d upstream classes: %s", len(done), ", ".join(done))
    return done


def unpatch_dust3r() -> None:
    """Undo every :func:`patch_dust3r` rebinding (models already built keep their modules)."""
    while _class_patches:
        module, name, original = _class_patches.pop()
        setattr(module, name, original)

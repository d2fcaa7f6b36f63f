"""patch_model / unpatch_model: swap fastpatch modules into an already-built model, and back."""
from __future__ import annotations

import logging
import warnings
from typing import Dict, Iterable

from torch import nn

from ..backend import BACKENDS
from .adoption import ORIGINAL, adopt
from .recognise import Recogniser
from .report import PatchRefusedError, PatchReport

__all__ = ["patch_model", "unpatch_model", "is_patched"]

logger = logging.getLogger("fastpatch")


def is_patched(model: nn.Module) -> bool:
    """True if ``model`` or any submodule is a fastpatch replacement made by :func:`patch_model`."""
    return any(ORIGINAL in m.__dict__ for m in model.modules())


def patch_model(model: nn.Module, *, backend: str = "auto", trust: Iterable[type] = (),
                strict: bool = False) -> nn.Module:
    """Replace the upstream DUSt3R-family modules inside ``model`` with fastpatch's, in place.

    Every module named like an upstream class (``PatchEmbedDust3R``, ``ManyAR_PatchEmbed``,
    ``RoPE2D``, ``cuRoPE2D``, ``Attention``, ``CrossAttention``, ``Block``, ``DecoderBlock``) is
    replaced when fastpatch's forward provably computes what its own forward computes: its code is
    a known upstream version, or it passes the behavioural probes, or its class is trusted (rules
    in :mod:`fastpatch.patching.recognise`). Anything else is left alone, with the reason in the
    report; the modules inside it are still visited and replaced where they qualify.

    Args:
        model: a built model (e.g. ``AsymmetricCroCo3DStereo.from_pretrained(...)``, a MASt3R model,
            :class:`fastpatch.reference.Dust3RBackbone`, or a single block).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``: the backend the replaced modules use
            (see :mod:`fastpatch.backend`); ``"auto"`` follows the global choice at each call,
            anything else pins it with forward hooks on each replaced module.
        trust: classes you know compute what upstream's class computes. Instances of exactly these
            classes are replaced without checking their code, attribute reads or extra children;
            the values fastpatch's forward reads (``attn_drop`` a ``nn.Dropout``, ``rope``'s
            ``base``/``F0``, the patch ``proj`` convolution...) are still checked. Each class stands for
            the upstream class it is named like or derives from.
        strict: raise :class:`PatchRefusedError` (leaving ``model`` unpatched) instead of warning
            when a module named like an upstream class is left alone.

    Returns:
        The patched model: ``model`` itself, unless ``model`` is itself a replaced module, in which
        case its replacement. Parameters are shared, never copied; patching twice is a no-op.
        ``model.fastpatch_report`` (a :class:`~fastpatch.patching.report.PatchReport`) says what was
        replaced and how it was accepted, and what was left alone and why.

    Warns:
        UserWarning: once per call when modules were left alone: how many, which classes, and what
            that costs in speed.

    Raises:
        ValueError: an unknown ``backend``, or a ``trust`` class that neither is named like nor
            derives from a class fastpatch replaces.
        TypeError: a ``trust`` entry that is not a class.
        PatchRefusedError: ``strict=True`` and some module was left alone.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {', '.join(BACKENDS)}")
    recogniser = Recogniser(trust)
    report = PatchReport()
    replacements: Dict[int, nn.Module] = {}  # id(original) -> replacement: shared modules stay shared

    def replacement(module: nn.Module, path: str) -> nn.Module:
        if id(module) in replacements:
            return replacements[id(module)]
        decision = recogniser.decide(module)
        new, label = module, path or "<root>"
        if decision is not None and decision.how is not None:
            new = adopt(module, recogniser.classes[decision.role], backend, decision.semantics)
            report.replaced.setdefault(decision.role, []).append(label)
            report.accepted_by[label] = decision.how
        elif decision is not None:
            report.left_alone.append((label, f"{decision.role}: {decision.reason}"))
            report.left_alone_types[label] = f"{type(module).__module__}.{type(module).__qualname__}"
        replacements[id(module)] = new
        visit(new, path)
        return new

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent._modules.items()):
            if child is not None:
                parent._modules[child_name] = replacement(child, f"{prefix}.{child_name}" if prefix else child_name)

    patched = replacement(model, "")
    if report.left_alone and strict:
        unpatch_model(patched)
        raise PatchRefusedError(f"{report.summary()}\n{report}")
    patched.__dict__["fastpatch_report"] = report
    logger.info("%s", report.summary())
    if report.left_alone:
        classes = ", ".join(sorted(set(report.left_alone_types.values())))
        warnings.warn(f"{report.summary()}. Classes left alone: {classes}. print(model.fastpatch_report) says "
                      f"why; pass trust=[cls] for a class you know computes upstream's function, or strict=True "
                      f"to raise.", UserWarning, stacklevel=2)
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
        original = module.__dict__.get(ORIGINAL)
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

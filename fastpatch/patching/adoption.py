"""A fastpatch module that adopts an upstream module's state (no copy), and its backend pin (:class:`BackendScope`)."""
from __future__ import annotations

import copy
from typing import Dict

from torch import nn

from ..backend import BackendScope

__all__ = ["ORIGINAL", "adopt", "BackendScope"]

#: The attribute under which a fastpatch module keeps the upstream module it replaced. Stored in
#: ``__dict__`` directly so it is neither a child module nor part of the state_dict.
ORIGINAL = "_fastpatch_original"


def adopt(original: nn.Module, cls: type, backend: str = "auto", semantics: Dict[str, object] = None) -> nn.Module:
    """A ``cls`` instance sharing ``original``'s parameters, buffers, children and attributes.

    The module-level dicts (``_parameters``, ``_modules``, hooks...) are copied shallowly so the
    new module can later hold replaced children while the original keeps its own; the tensors
    and child objects inside them are shared, not copied. ``semantics``: instance attributes that
    tell the replacement what the original ignored (e.g. ``ignored_attributes`` of
    :class:`fastpatch.Attention`). ``backend`` other than ``"auto"`` pins the replacement's backend
    with forward hooks.
    """
    new = cls.__new__(cls)
    for key, value in original.__dict__.items():
        new.__dict__[key] = copy.copy(value) if isinstance(value, dict) else value
    new.__dict__[ORIGINAL] = original
    new.__dict__.update(semantics or {})
    if backend != "auto":
        scope = BackendScope(backend)
        new.register_forward_pre_hook(scope.enter)
        new.register_forward_hook(scope.exit, always_call=True)
    return new

"""A fastpatch module that adopts an upstream module's state (no copy), and its backend pin."""
from __future__ import annotations

import copy
import threading
from typing import Dict, List

from torch import nn

from ..backend import reset_backend_override, set_backend_override

__all__ = ["ORIGINAL", "adopt", "BackendScope"]

#: The attribute under which a fastpatch module keeps the upstream module it replaced. Stored in
#: ``__dict__`` directly so it is neither a child module nor part of the state_dict.
ORIGINAL = "_fastpatch_original"


class BackendScope:
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

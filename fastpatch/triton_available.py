"""Whether triton can be imported in this process: asked once, on the first op that would use it.

torch builds for Windows and macOS, and some conda builds, come without triton. ``import fastpatch``
never imports triton, so it works there; :mod:`fastpatch.backend` asks this module only when the
kernels would run (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``):

* ``auto`` then runs the torch path, with one ``RuntimeWarning`` per process saying why
  (:func:`warn_without_triton`);
* a forced ``triton`` raises ``RuntimeError`` naming the import error (:func:`require_triton`).

The answer is cached (a failed import is not retried), so later calls cost a global read. The
modules that need triton (the Triton custom ops) are likewise imported on their first use, through
:func:`imported_once`.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional, TypeVar

import torch

__all__ = ["triton_import_error", "triton_available", "require_triton", "warn_without_triton", "imported_once"]

T = TypeVar("T")

_NOT_ASKED = object()
_import_error: object = _NOT_ASKED  # None once triton imported; else the reason it did not (str)
_warned = False


def triton_import_error() -> Optional[str]:
    """None when ``import triton`` works here, else why it fails (``"ModuleNotFoundError: ..."``).

    The import is attempted once per process; afterwards this is a global read (which
    ``torch.compile`` traces and guards on).
    """
    global _import_error
    if _import_error is _NOT_ASKED:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # any failure to import (missing, broken build) means no kernels
            _import_error = f"{type(exc).__name__}: {exc}"
        else:
            _import_error = None
    return _import_error


def triton_available() -> bool:
    """True when triton imports in this process (see :func:`triton_import_error`)."""
    return triton_import_error() is None


def require_triton(device: torch.device) -> None:
    """Raise ``RuntimeError`` when the ``triton`` backend is forced for ``device`` but triton does not import."""
    reason = triton_import_error()
    if reason is not None:
        raise RuntimeError(
            f"fastpatch backend 'triton' was forced for tensors on {device}, but triton cannot be imported "
            f"({reason}); install the triton that matches your torch, or use the torch backend "
            "(FASTPATCH_BACKEND=torch or fastpatch.use_backend('torch'))")


def warn_without_triton(device: torch.device) -> None:
    """The one ``RuntimeWarning`` per process saying that ops the kernels would run use the torch path."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"fastpatch: triton cannot be imported ({triton_import_error()}), so ops on {device} tensors run on the "
        "torch path instead of the Triton kernels (correct, slower); install the triton that matches your torch "
        "to use the kernels. This warning is shown once.", RuntimeWarning, stacklevel=4)


def imported_once(load: Callable[[], T]) -> Callable[[], T]:
    """Decorator for a function that imports something needing triton and returns it: the import runs
    on the first call; every later call returns the held result (a closure read: no import machinery).

    ``import fastpatch`` must not import triton, so the modules defining the Triton custom ops are
    imported when an op first runs on the Triton backend (which :mod:`fastpatch.backend` chooses
    only once triton imports). The decorated function holds the ``import`` statement itself:
    ``torch.compile`` traces an import statement and the closure update, not
    ``importlib.import_module``, so a first call inside a compiled region works. A call that raises
    holds nothing (the next one retries).

    Example::

        @imported_once
        def _triton_op():
            from .patch_embed_triton import patch_embed_triton
            return patch_embed_triton

        tokens, pos = _triton_op()(img, weight, bias, p, portrait)
    """
    value: Optional[T] = None

    @functools.wraps(load)
    def held() -> T:
        nonlocal value
        if value is None:
            value = load()
        return value

    return held

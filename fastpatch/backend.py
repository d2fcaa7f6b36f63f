"""The one place that decides which implementation runs: the Triton kernels or the torch path.

Rules (``auto``, the default):

* CUDA tensors run the compiled Triton kernels.
* CPU tensors run the fastest torch path, unless the Triton interpreter is active
  (``TRITON_INTERPRET=1`` in the environment before ``triton`` is imported): then CPU tensors
  go through the Triton kernels, which is how the kernels are tested on machines with no GPU.
* Any other device (e.g. ``mps``) runs the torch path.

Overrides, strongest first:

* ``with fastpatch.use_backend("torch"):`` (or ``"triton"`` / ``"auto"``) for the current thread
  (a per-thread stack in a :class:`threading.local`, which ``torch.compile`` traces and guards on,
  so the choice is made at trace time without graph breaks and a different choice recompiles);
* the environment variable ``FASTPATCH_BACKEND=triton|torch|auto``.

Environment variables are read once, when this module is imported (``import fastpatch``), not at
each call: ``FASTPATCH_BACKEND`` and ``TRITON_INTERPRET`` (which only takes effect if it is set before
``triton`` is imported anyway). A program that changes them afterwards calls
:func:`refresh_environment`. An invalid ``FASTPATCH_BACKEND`` raises :class:`ValueError` at the first
call that needs the backend, not at import.

Forcing ``triton`` for tensors that no Triton backend can run (CPU without the interpreter)
raises :class:`RuntimeError`; it never falls back silently. Without an importable triton (see
:mod:`fastpatch.triton_available`), ``auto`` runs the torch path where it would run the kernels,
with one warning, and a forced ``triton`` raises.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, List, Optional

import torch

from .triton_available import require_triton, triton_available, warn_without_triton

__all__ = [
    "BACKENDS",
    "interpreter_active",
    "refresh_environment",
    "requested_backend",
    "use_backend",
    "set_backend_override",
    "reset_backend_override",
    "select_backend",
    "common_device",
]

BACKENDS = ("auto", "triton", "torch")

# The per-thread stack of forced backends, innermost last, under the attribute ``stack``. A plain
# ``threading.local`` (not a subclass) and list mutation only: what torch.compile traces (torch >= 2.4).
_overrides = threading.local()


def _stack() -> List[str]:
    stack = getattr(_overrides, "stack", None)
    if stack is None:
        stack = _overrides.stack = []
    return stack


def _validate(name: str, source: str) -> str:
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a fastpatch backend; expected one of {', '.join(BACKENDS)}")
    return value


# What the environment asked for, as last read by refresh_environment(): the interpreter flag, and
# the FASTPATCH_BACKEND choice or the error an invalid value raises at its first use.
_interpreter = False
_env_backend = "auto"
_env_backend_error: Optional[str] = None


def refresh_environment() -> None:
    """(Re-)read ``TRITON_INTERPRET`` and ``FASTPATCH_BACKEND``; done once when this module is imported.

    Call it after changing either variable in a running program. ``TRITON_INTERPRET`` only decides
    how ``triton`` runs kernels when it is set before ``triton`` is imported.
    """
    global _interpreter, _env_backend, _env_backend_error
    _interpreter = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")
    env = os.environ.get("FASTPATCH_BACKEND")
    _env_backend, _env_backend_error = "auto", None
    if env is not None and env.strip() != "":
        try:
            _env_backend = _validate(env, "FASTPATCH_BACKEND")
        except ValueError as exc:
            _env_backend_error = str(exc)


refresh_environment()


def interpreter_active() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the Triton interpreter (kernels run on CPU in numpy).

    The value read at import, or by the last :func:`refresh_environment`.
    """
    return _interpreter


def requested_backend() -> str:
    """The backend asked for: the innermost :func:`use_backend`, else ``FASTPATCH_BACKEND``, else ``"auto"``.

    Raises:
        ValueError: ``FASTPATCH_BACKEND`` (as last read) names no backend.
    """
    stack = _stack()
    if stack:
        return stack[-1]
    if _env_backend_error is not None:
        raise ValueError(_env_backend_error)
    return _env_backend


def set_backend_override(name: str) -> int:
    """Force ``name`` in the current thread until :func:`reset_backend_override` (prefer :func:`use_backend`).

    Returns:
        A token: the depth of the override stack before this call.
    """
    value = _validate(name, "backend")
    stack = _stack()
    stack.append(value)
    return len(stack) - 1


def reset_backend_override(token: int) -> None:
    """Undo the :func:`set_backend_override` call that returned ``token`` (and any made after it)."""
    del _stack()[token:]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager forcing a backend (``"auto"``, ``"triton"`` or ``"torch"``) inside its block.

    Example::

        with fastpatch.use_backend("torch"):
            tokens, pos = patch_embed(img)
    """
    token = set_backend_override(name)
    try:
        yield
    finally:
        reset_backend_override(token)


def common_device(*tensors: Optional[torch.Tensor]) -> torch.device:
    """The one device shared by all given tensors (``None`` entries are skipped).

    Raises:
        ValueError: if the tensors live on different devices, naming them.
    """
    devices = []
    for t in tensors:
        if t is not None and t.device not in devices:
            devices.append(t.device)
    if not devices:
        raise ValueError("common_device needs at least one tensor")
    if len(devices) > 1:
        raise ValueError(f"expected all tensors on one device, got {', '.join(str(d) for d in devices)}")
    return devices[0]


def _triton_can_run(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_active()


def select_backend(*tensors: Optional[torch.Tensor]) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose inputs are ``tensors``.

    Raises:
        ValueError: tensors on different devices.
        RuntimeError: ``triton`` was forced for a device no Triton backend runs on, or without triton.
    """
    device = common_device(*tensors)
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if not _triton_can_run(device):
            raise RuntimeError(
                f"fastpatch backend 'triton' was forced but the tensors are on {device}; Triton runs on CUDA, "
                "or on CPU only with TRITON_INTERPRET=1 set before triton is imported"
            )
        require_triton(device)
        return "triton"
    if not _triton_can_run(device):
        return "torch"
    if not triton_available():
        warn_without_triton(device)
        return "torch"
    return "triton"

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

Where the Triton backend is chosen (or forced) but the kernels cannot take the call's inputs --
inputs carrying forward-mode AD tangents, a dtype or head dim without kernels, dropout -- the op
runs the torch path with a ``RuntimeWarning`` giving the reason. :func:`decide` is the one function
that applies all of these rules, for both ops and for the self-check (``python -m fastpatch``).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from .kernels.patch_embed_configs import DTYPES as PATCH_EMBED_DTYPES  # plain tables: no triton import
from .kernels.rope_attention_configs import DTYPES as ATTENTION_DTYPES
from .kernels.rope_attention_configs import HEAD_DIMS as ATTENTION_HEAD_DIMS
from .ops.forward_ad import carries_tangents
from .triton_available import require_triton, triton_available, triton_import_error, warn_without_triton

__all__ = [
    "BACKENDS",
    "OPS",
    "Decision",
    "decide",
    "interpreter_active",
    "refresh_environment",
    "requested_backend",
    "use_backend",
    "set_backend_override",
    "reset_backend_override",
    "select_backend",
    "common_device",
    "BackendScope",
    "pins_in_force",
]

BACKENDS = ("auto", "triton", "torch")
#: The ops :func:`decide` knows.
OPS = ("rope_attention", "patch_embed", "qknorm_rope_attention")

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


class Decision(NamedTuple):
    """Which implementation runs an op's call, and why (:func:`decide`).

    Attributes:
        backend: ``"triton"`` or ``"torch"``.
        reason: why, in words (what ``python -m fastpatch`` prints).
        fallback: True when the Triton backend was chosen but its kernels cannot take these inputs,
            so the torch path stands in: the op warns with ``reason``.
    """

    backend: str
    reason: str
    fallback: bool = False


_FORCED_TORCH = Decision("torch", "forced (FASTPATCH_BACKEND=torch or use_backend('torch'))")
#: (on CUDA, forced) -> the decision to run the kernels.
_TRITON: Dict[Tuple[bool, bool], Decision] = {
    (on_cuda, forced): Decision("triton", ("compiled Triton kernels on CUDA" if on_cuda else
                                           "Triton kernels in the interpreter (TRITON_INTERPRET=1: slow, for testing)")
                                + (" (forced)" if forced else ""))
    for on_cuda in (True, False) for forced in (True, False)
}
_CPU_TORCH = Decision("torch", "CPU tensors run the torch path (TRITON_INTERPRET=1, set before triton is imported, "
                               "would run the kernels in the Triton interpreter instead)")


def _attention_refusal(tensors, dtype: Optional[torch.dtype] = None, head_dim: Optional[int] = None,
                       dropout_p: Optional[float] = None, kernels: str = "attention") -> Optional[str]:
    """Why the Triton ``kernels`` ("attention", or "qk-norm attention": the same head-dim and dtype
    tables) refuse a call, or None."""
    if carries_tangents(*tensors):
        return f"the Triton {kernels} kernels have no forward-mode AD formula (dual tensors)"
    if dropout_p is not None and dropout_p > 0.0:
        return f"the Triton {kernels} kernels have no dropout (dropout_p > 0)"
    if head_dim is not None and head_dim not in ATTENTION_HEAD_DIMS:
        return f"the Triton {kernels} kernels support head dims {ATTENTION_HEAD_DIMS}, got {head_dim}"
    if dtype is not None and dtype not in ATTENTION_DTYPES:
        return f"the Triton {kernels} kernels support float16/bfloat16/float32, got {dtype}"
    return None


def _patch_embed_refusal(tensors, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    if dtype is not None and dtype not in PATCH_EMBED_DTYPES:
        return f"the Triton patch-embedding kernels support float32/float16/bfloat16, got {dtype}"
    if carries_tangents(*tensors):
        return "the Triton patch-embedding kernels have no forward-mode AD formula (dual tensors)"
    return None


#: op -> why its kernels refuse a call (None: they take it), from the call's tensors and facts.
_REFUSALS = {"rope_attention": _attention_refusal, "patch_embed": _patch_embed_refusal,
             "qknorm_rope_attention": functools.partial(_attention_refusal, kernels="qk-norm attention")}


def decide(op: Optional[str], *tensors: Optional[torch.Tensor], **facts) -> Decision:
    """Which backend runs ``op`` on these inputs, and why: the one place the rules are applied.

    Args:
        op: ``"rope_attention"``, ``"patch_embed"`` or ``"qknorm_rope_attention"`` (:data:`OPS`); None
            applies the device rules only.
        tensors: the call's tensors (None entries skipped): their one device, and whether any carries
            a forward-mode AD tangent.
        facts: what else the kernels depend on; a fact not given is not checked. ``rope_attention`` and
            ``qknorm_rope_attention``: ``dtype``, ``head_dim``, ``dropout_p``; ``patch_embed``: ``dtype``
            (after autocast).

    Returns:
        A :class:`Decision` ``(backend, reason, fallback)``. Without triton, where ``auto`` would run the
        kernels, the torch path is chosen and the one no-triton ``RuntimeWarning`` per process is issued.

    Raises:
        ValueError: tensors on different devices, an invalid ``FASTPATCH_BACKEND``, an unknown ``op``.
        RuntimeError: ``triton`` was forced for a device no Triton backend runs on, or without triton.
    """
    refusal = _REFUSALS.get(op) if op is not None else None
    if refusal is None and op is not None:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    device = common_device(*tensors)
    requested = requested_backend()
    if requested == "torch":
        return _FORCED_TORCH
    forced = requested == "triton"
    if forced:
        if not _triton_can_run(device):
            raise RuntimeError(
                f"fastpatch backend 'triton' was forced but the tensors are on {device}; Triton runs on CUDA, "
                "or on CPU only with TRITON_INTERPRET=1 set before triton is imported"
            )
        require_triton(device)
    elif not _triton_can_run(device):
        return _CPU_TORCH if device.type == "cpu" else Decision(
            "torch", f"no Triton backend for {device.type} tensors: the torch path")
    elif not triton_available():
        warn_without_triton(device)
        return Decision("torch", f"triton cannot be imported ({triton_import_error()}), so the torch path runs "
                                 "instead of the kernels")
    reason = refusal(tensors, **facts) if refusal is not None else None
    if reason is not None:
        return Decision("torch", reason, fallback=True)
    return _TRITON[(device.type == "cuda", forced)]


def select_backend(*tensors: Optional[torch.Tensor]) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose inputs are ``tensors``: :func:`decide`'s device rules.

    Raises:
        ValueError: tensors on different devices.
        RuntimeError: ``triton`` was forced for a device no Triton backend runs on, or without triton.
    """
    return decide(None, *tensors).backend


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


def pins_in_force(module) -> bool:
    """Whether ``module``'s hooks are at most :class:`BackendScope` pins of the backend already forced in
    this thread (:func:`requested_backend`): a parent that reads the module's parameters instead of
    calling it (a fused block) then computes exactly what calling it would. False for any other hook,
    for a pin of another backend, and when the requested backend cannot be read."""
    if module._backward_hooks or module._backward_pre_hooks or module._forward_pre_hooks_with_kwargs:
        return False
    hooks = (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
    if not hooks:
        return True
    scopes = {getattr(hook, "__self__", None) for hook in hooks}
    if not all(isinstance(scope, BackendScope) for scope in scopes):
        return False
    try:
        requested = requested_backend()
    except ValueError:
        return False
    return all(scope.backend == requested for scope in scopes)

"""When a Triton op may skip its ``torch.library`` custom op and call its launcher directly.

The custom ops exist for autograd (``register_autograd``) and for tracers (``torch.compile``, fake
tensors, functorch), which need an opaque op with a fake implementation. A plain eager call that
records no graph -- inference under ``torch.no_grad()`` / ``torch.inference_mode()``, or inputs
that do not require grad -- needs neither, and the custom-op dispatch is host time (about 10 us a
call on torch 2.13; ``bench/test_bench_host_overhead.py``), which at batch 1 on a GPU is a large part
of an attention call. Both paths run the same launcher on the same tensors: the results are identical.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["launch_directly"]

_C = torch._C
# Private torch predicates (present in torch 2.5 to 2.13); where one is missing the custom op is always used.
_DISPATCH_MODES = getattr(_C, "_len_torch_dispatch_stack", None)
_FUNCTION_MODES = getattr(_C, "_is_torch_function_mode_enabled", None)
_FUNCTORCH = getattr(_C, "_are_functorch_transforms_active", None)
_JIT_TRACING = getattr(_C, "_get_tracing_state", None)
_AVAILABLE = None not in (_DISPATCH_MODES, _FUNCTION_MODES, _FUNCTORCH, _JIT_TRACING)


def launch_directly(*tensors: Optional[torch.Tensor]) -> bool:
    """True when a call on ``tensors`` (None entries ignored) may run the launcher without the custom op:
    nothing will record it -- autograd (grad mode on and an input requiring grad), ``torch.compile``
    tracing, ``torch.jit.trace`` (TorchScript / legacy ONNX export: it records ops, never a launcher),
    a torch dispatch or function mode (fake tensors, export, spies), a functorch transform --
    and every input is a plain ``torch.Tensor`` (no subclass such as ``FakeTensor``)."""
    if not _AVAILABLE or torch.compiler.is_compiling():
        return False
    if _DISPATCH_MODES() or _FUNCTION_MODES() or _FUNCTORCH() or _JIT_TRACING() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    return True

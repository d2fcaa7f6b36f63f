"""Whether fastpatch's kernels run in the Triton interpreter: the one flag every launcher reads.

``@triton.jit`` builds an interpreted function instead of a compiled one when ``TRITON_INTERPRET``
is set at the time it decorates the kernel, so the kernel objects themselves say which one runs;
that cannot change afterwards. The interpreter computes bfloat16 on the raw bits (wrong), so the
launchers then ask the kernels to upcast every loaded bf16 value to fp32 first.

(:func:`fastpatch.backend.interpreter_active` is the routing switch -- whether CPU tensors go to the
kernels -- read from the environment because it must answer before triton is imported.)
"""
from __future__ import annotations

from ..kernels.patch_embed import patch_embed_fwd_kernel

__all__ = ["INTERPRETED", "built_for_interpreter"]


def built_for_interpreter(kernel: object) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` function) was built for the Triton interpreter."""
    return type(kernel).__name__ == "InterpretedFunction"


#: True when the kernels run in the Triton interpreter (read once, from a kernel object).
INTERPRETED = built_for_interpreter(patch_embed_fwd_kernel)

"""Peak memory of a call on any device, from the tensors it allocates (a torch dispatch mode).

CUDA has ``torch.cuda.max_memory_allocated``; the CPU allocator keeps no statistics, so
:func:`peak_tensor_bytes` counts the storages the call's ops create (views of an op's inputs
excluded) while they are alive, and returns the largest sum. Scratch buffers an op allocates inside
its kernel and frees before returning (e.g. SDPA's per-thread blocks) are not seen; they are the
same for every caller of that op.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["peak_tensor_bytes"]


class _LiveStorages(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.seen = set()

    def _release(self, key: int, size: int) -> None:
        self.live -= size
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key in inputs or key in self.seen or size == 0:
                continue
            self.seen.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, size)
        return out


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """The most bytes of tensors created by ``fn()`` alive at once (its result included, inputs excluded)."""
    mode = _LiveStorages()
    with mode:
        result = fn()
    del result
    return mode.peak

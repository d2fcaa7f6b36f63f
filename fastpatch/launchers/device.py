"""Run Triton launches on the device that holds their tensors.

A Triton launch goes to the *current* CUDA device (and its current stream), not to the device of
the pointers it is given. With a model on ``cuda:1`` while the current device is ``cuda:0``, an
unguarded launch reads ``cuda:1`` memory from a kernel running on ``cuda:0``: an illegal memory
access. Every launcher enters :func:`launch_device` around its launches.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

__all__ = ["launch_device", "capturing_cuda_graph", "refuse_first_use_in_capture"]

_NO_GUARD = contextlib.nullcontext()


def launch_device(device: torch.device) -> ContextManager:
    """Context manager making ``device`` the current CUDA device for the launches inside it.

    Args:
        device: the device of the launch's tensors. Non-CUDA devices (the interpreter's CPU
            tensors) and ``cuda`` without an index (the current device already) need no guard: a
            shared no-op context is returned.

    Returns:
        ``torch.cuda.device(device.index)`` for an indexed CUDA device (it restores the previous
        current device on exit), else a no-op context.
    """
    if device.type != "cuda" or device.index is None:
        return _NO_GUARD
    return torch.cuda.device(device.index)


def capturing_cuda_graph(device: torch.device) -> bool:
    """True for a CUDA ``device`` while the current CUDA stream captures a graph. Not asked under
    ``torch.compile`` tracing, nor for other devices (so they never initialise CUDA)."""
    return device.type == "cuda" and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing()


def refuse_first_use_in_capture(device: torch.device, what: str) -> None:
    """Raise ``RuntimeError`` when a cache of ``what`` on ``device`` would be filled inside a CUDA graph
    capture: the graph would hold the (host-to-device) copy that fills it, replaying a read of freed
    host memory, and the cache would keep memory of the graph's private pool. Called on cache misses
    only, so warm calls pay nothing; the usual warm-up call before capturing fills every cache."""
    if capturing_cuda_graph(device):
        raise RuntimeError(f"fastpatch builds its {what} for {device} on first use, and this first use is inside a "
                           "CUDA graph capture: run the model (or op) once on this device before capturing")

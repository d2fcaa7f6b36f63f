"""Encoder features per image, with bounded device memory: what does not fit is spilled to the CPU.

Over-budget policy (chosen over recomputation): the encoder is about 70% of a pair's FLOPs, while
moving one image's features is cheap (ViT-L at 512x384: 768 tokens x 1024 channels, 3 MiB in fp32,
a fraction of a millisecond over PCIe against about 523 GFLOP to recompute). So when keeping a new
entry on its device would exceed the device budget, the least recently used resident entries are
moved to host memory (the newcomer itself when it alone is larger than the budget). A spilled entry
stays on the host; :meth:`FeatureCache.get` copies it to the compute device for the batch that
needs it and the copy is freed with the batch. Stored tensors own their memory (a slice of a larger
batch tensor is compacted first), so the device bytes counted are the device bytes held.

An optional host budget bounds the host side too: beyond it, the least recently used host entries
are dropped (they are recomputed if asked for again). Entries may name owner objects (the image
tensor, the model): when an owner is garbage-collected, its entries are dropped at once.
"""
from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Iterable, Optional, Tuple

import torch

__all__ = ["FeatureCache", "CacheStats", "FeatureSignature", "default_device_budget", "BUDGET_ENV"]

#: Environment variable: device budget for encoder features, in MiB (overrides the default).
BUDGET_ENV = "FASTPATCH_FEATURE_BUDGET_MB"

#: Default share of a CUDA device's total memory that encoder features may hold.
DEFAULT_CUDA_SHARE = 0.25

#: What the decoder batching needs to know about an entry: (rows, token shape, token dtype, pos shape, pos dtype).
FeatureSignature = Tuple[int, Tuple[int, ...], torch.dtype, Tuple[int, ...], torch.dtype]


def default_device_budget(device: torch.device) -> Optional[int]:
    """Device budget in bytes: ``FASTPATCH_FEATURE_BUDGET_MB`` if set, else a quarter of a CUDA
    device's memory, else ``None`` (unbounded: on the CPU the features already live in host memory).

    Raises:
        ValueError: the environment variable is not a non-negative number.
    """
    text = os.environ.get(BUDGET_ENV)
    if text:
        try:
            megabytes = float(text)
        except ValueError:
            raise ValueError(f"{BUDGET_ENV} must be a number of MiB, got {text!r}") from None
        if megabytes < 0:
            raise ValueError(f"{BUDGET_ENV} must be >= 0, got {text!r}")
        return int(megabytes * 2**20)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory * DEFAULT_CUDA_SHARE)
    return None


@dataclass
class CacheStats:
    """Counters since the cache was made (or cleared)."""

    stored: int = 0  # entries put
    spilled: int = 0  # entries moved from the device to host memory
    reloaded: int = 0  # copies of spilled entries made on the device for a batch
    dropped: int = 0  # entries dropped for the host budget
    peak_device_bytes: int = 0  # most bytes resident on devices at once


@dataclass(eq=False)
class _Entry:
    feat: torch.Tensor
    pos: torch.Tensor
    home: torch.device  # where the features were computed and are wanted
    nbytes: int
    refs: Tuple[weakref.ref, ...]


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it spans its whole storage, else a compact copy (so a slice frees its batch)."""
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone(memory_format=torch.contiguous_format)
    return t


class FeatureCache:
    """Encoder outputs ``(tokens (B, N, C), pos (B, N, 2))`` keyed by image identity.

    Args:
        device_budget: most bytes kept on the compute device (``None``: no limit); see the module
            docstring for what happens beyond it.
        host_budget: most bytes kept in host memory (``None``: no limit); beyond it the least
            recently used host entries are dropped.
    """

    def __init__(self, device_budget: Optional[int] = None, host_budget: Optional[int] = None):
        for name, value in (("device_budget", device_budget), ("host_budget", host_budget)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative int of bytes or None, got {value!r}")
        self.device_budget = device_budget
        self.host_budget = host_budget
        self.stats = CacheStats()
        self._entries: "OrderedDict[Hashable, _Entry]" = OrderedDict()  # least recently used first
        self._resident: set = set()  # keys whose tensors are on their home device
        self._device_bytes = 0
        self._host_bytes = 0
        self._lock = threading.RLock()

    # -- queries ------------------------------------------------------------------------------
    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def device_bytes(self) -> int:
        """Bytes currently held on compute devices."""
        return self._device_bytes

    @property
    def host_bytes(self) -> int:
        """Bytes currently spilled to host memory."""
        return self._host_bytes

    def is_resident(self, key: Hashable) -> bool:
        """True when the entry is on its compute device (not spilled)."""
        with self._lock:
            return key in self._resident

    def signature(self, key: Hashable) -> FeatureSignature:
        """Rows, token shape/dtype and position shape/dtype of an entry, without moving it."""
        with self._lock:
            entry = self._entries[key]
        return (entry.feat.shape[0], tuple(entry.feat.shape[1:]), entry.feat.dtype, tuple(entry.pos.shape[1:]),
                entry.pos.dtype)

    # -- updates ------------------------------------------------------------------------------
    def put(self, key: Hashable, feat: torch.Tensor, pos: torch.Tensor, owners: Iterable[object] = ()) -> None:
        """Store one image's features (``feat`` and ``pos`` on the compute device), replacing ``key``.

        ``owners``: objects whose collection drops the entry (weak references; no strong ones are kept).
        """
        if feat.device != pos.device:
            raise ValueError(f"feat on {feat.device} but pos on {pos.device}")
        feat, pos = _owned(feat), _owned(pos)
        nbytes = feat.numel() * feat.element_size() + pos.numel() * pos.element_size()
        refs = tuple(weakref.ref(owner, self._owner_collected(key)) for owner in owners)
        entry = _Entry(feat=feat, pos=pos, home=feat.device, nbytes=nbytes, refs=refs)
        with self._lock:
            self._remove(key)
            self._entries[key] = entry
            self._resident.add(key)
            self._device_bytes += nbytes
            self.stats.stored += 1
            self._enforce_device_budget(newest=key)
            self.stats.peak_device_bytes = max(self.stats.peak_device_bytes, self._device_bytes)
            self._enforce_host_budget()

    def get(self, key: Hashable) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(feat, pos)`` on the device they were computed on, or ``None`` when absent.

        A spilled entry is copied to that device for the caller and stays spilled; the copy is the
        caller's (freed with it).
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            if key in self._resident:
                return entry.feat, entry.pos
            self.stats.reloaded += 1
        return entry.feat.to(entry.home, non_blocking=True), entry.pos.to(entry.home, non_blocking=True)

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        with self._lock:
            self._entries.clear()
            self._resident.clear()
            self._device_bytes = self._host_bytes = 0
            self.stats = CacheStats()

    # -- internals ----------------------------------------------------------------------------
    def _owner_collected(self, key: Hashable):
        cache = weakref.ref(self)

        def drop(ref: weakref.ref) -> None:
            this = cache()
            if this is None:
                return
            with this._lock:
                entry = this._entries.get(key)
                if entry is not None and any(r is ref for r in entry.refs):
                    this._remove(key)

        return drop

    def _remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if key in self._resident:
            self._resident.discard(key)
            self._device_bytes -= entry.nbytes
        else:
            self._host_bytes -= entry.nbytes

    def _spill(self, key: Hashable) -> None:
        entry = self._entries[key]
        entry.feat, entry.pos = entry.feat.to("cpu"), entry.pos.to("cpu")
        self._resident.discard(key)
        self._device_bytes -= entry.nbytes
        self._host_bytes += entry.nbytes
        self.stats.spilled += 1

    def _enforce_device_budget(self, newest: Hashable) -> None:
        if self.device_budget is None or self._device_bytes <= self.device_budget:
            return
        if self._entries[newest].nbytes > self.device_budget:
            self._spill(newest)
            return
        for key in [k for k in self._entries if k in self._resident and k != newest]:
            if self._device_bytes <= self.device_budget:
                break
            self._spill(key)

    def _enforce_host_budget(self) -> None:
        if self.host_budget is None:
            return
        for key in [k for k in self._entries if k not in self._resident]:
            if self._host_bytes <= self.host_budget:
                break
            self._remove(key)
            self.stats.dropped += 1

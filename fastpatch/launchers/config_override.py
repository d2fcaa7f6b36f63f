"""Launch configs given by hand (the launchers' ``override_config``, used by the tuning sweeps): one
mechanism for every op -- their validation, and :class:`ConfigOverrides`, the registry a launcher
consults before its config table."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Hashable, Iterator, MutableMapping, Optional

__all__ = ["check_tile_config", "temporary_entry", "ConfigOverrides"]


def check_tile_config(name: str, blocks: Dict[str, int], num_warps: int, num_stages: int) -> None:
    """Raise ``ValueError`` unless every block size in ``blocks`` (field name -> size) is a power of two
    >= 16 (``tl.dot``'s minimum), ``num_warps`` is a power of two <= 16 and ``num_stages >= 1``.
    ``name`` says which kernel's config is wrong."""
    for field, size in blocks.items():
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}.{field} must be a power of two >= 16 (tl.dot's minimum), got {size}")
    if num_warps not in (1, 2, 4, 8, 16) or num_stages < 1:
        raise ValueError(f"{name}: num_warps must be 1, 2, 4, 8 or 16 and num_stages >= 1, "
                         f"got num_warps={num_warps}, num_stages={num_stages}")


@contextmanager
def temporary_entry(mapping: MutableMapping, key: Hashable, value: object) -> Iterator[None]:
    """``mapping[key] = value`` inside the block; the previous entry (or none) is back after, also on error."""
    missing = object()
    saved = mapping.get(key, missing)
    mapping[key] = value
    try:
        yield
    finally:
        if saved is missing:
            mapping.pop(key, None)
        else:
            mapping[key] = saved


class ConfigOverrides:
    """The configs given by hand for one op, by the key of the table lookup they replace.

    A launcher asks :meth:`get` when it builds what it caches (launch plans, launch keywords) and
    falls back to its config table; :meth:`override` empties those ``caches`` on entry and on exit,
    so a call never pays for the check. Not thread-safe (tuning sweeps only).
    """

    def __init__(self, *caches: MutableMapping) -> None:
        self._configs: Dict[Hashable, object] = {}
        self._caches = caches

    def get(self, key: Hashable) -> Optional[object]:
        """The config given for ``key`` inside an :meth:`override` block, else None."""
        return self._configs.get(key) if self._configs else None

    def active(self) -> Dict[Hashable, object]:
        """A copy of the configs given now, by key (empty outside every :meth:`override` block)."""
        return dict(self._configs)

    @contextmanager
    def override(self, key: Hashable, config: object) -> Iterator[None]:
        """Inside the block, :meth:`get` of ``key`` gives ``config`` (nested blocks: the innermost)."""
        with temporary_entry(self._configs, key, config):
            self._clear_caches()
            try:
                yield
            finally:
                self._clear_caches()

    def _clear_caches(self) -> None:
        for cache in self._caches:
            cache.clear()

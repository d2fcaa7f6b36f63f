"""Launch configs given by hand (the launchers' ``override_config``, used by the tuning sweeps):
their validation and the temporary entry that stands in for the config table's."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Hashable, Iterator, MutableMapping

__all__ = ["check_tile_config", "temporary_entry"]


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

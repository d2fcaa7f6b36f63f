"""Which images encode together, which pairs decode together, which rows share a head call.

* Images batch by tensor shape and dtype (a ManyAR batch may mix true shapes: its patch embedding
  reads them per row).
* Pairs batch by what the decoder sees: the token and position shapes of both sides. A portrait and
  a landscape image of the same size have the same number of tokens (their layout lives in the
  positions), so mixed-orientation scenes decode in full batches.
* Heads reshape tokens into an image of the true shape, so within a decoder batch a head is called
  once per distinct true shape of its side.

Groups come in order of first appearance and keep the original order inside, so results can be put
back in place by index.
"""
from __future__ import annotations

from typing import Callable, Dict, Hashable, List, Sequence, TypeVar

__all__ = ["group_in_order", "chunked", "encoder_batches", "pair_batches"]

T = TypeVar("T")


def group_in_order(items: Sequence[T], key: Callable[[T], Hashable]) -> List[List[T]]:
    """``items`` split by ``key``, groups in order of first appearance, items in order within a group."""
    groups: Dict[Hashable, List[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())


def chunked(items: Sequence[T], size: int) -> List[List[T]]:
    """Consecutive runs of at most ``size`` items (``size`` >= 1)."""
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def encoder_batches(images: Sequence[T], shape_of: Callable[[T], Hashable], rows_of: Callable[[T], int],
                    batch_rows: int) -> List[List[T]]:
    """Images grouped by ``shape_of`` (tensor shape and dtype), in batches of about ``batch_rows`` rows
    (at least one image each)."""
    return [batch for group in group_in_order(images, shape_of)
            for batch in chunked(group, max(1, batch_rows // rows_of(group[0])))]


def pair_batches(pair_ids: Sequence[int], signature_of: Callable[[int], Hashable], rows_of: Callable[[int], int],
                 batch_size: int) -> List[List[int]]:
    """Pair indices grouped by the decoder inputs' ``signature_of`` (shapes/dtypes of both sides, rows
    included), in batches of at most ``batch_size`` rows (at least one pair each)."""
    return [batch for group in group_in_order(pair_ids, signature_of)
            for batch in chunked(group, max(1, batch_size // rows_of(group[0])))]

"""Scale-out over ``torch.distributed``: contiguous shards of the pairs, results gathered on every rank.

Every rank calls :func:`fastpatch.inference` with the same pairs (same order and shapes; this is
checked, one small collective). Rank ``r`` of ``W`` takes the ``r``-th of ``W`` contiguous, near-equal
runs of the pair list, encodes only the images its own pairs use and decodes its pairs. The per-pair
CPU predictions are then exchanged with ``all_gather_object`` and concatenated in rank order, which
is the original pair order, so every rank returns the full result. With NCCL, ``all_gather_object``
stages the pickled bytes through the current CUDA device (``torch.cuda.set_device(local_rank)``).
"""
from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence, Tuple

import torch

from .identity import ImageView

__all__ = ["active_world", "shard", "pairs_signature", "check_same_pairs", "gather_in_order"]


def active_world(requested: Optional[bool]) -> Optional[Tuple[int, int]]:
    """``(rank, world_size)`` when pairs are to be sharded, else ``None``.

    ``requested``: ``None`` shards whenever ``torch.distributed`` is initialised with more than one
    rank, ``False`` never shards, ``True`` requires an initialised process group.

    Raises:
        RuntimeError: ``requested`` is True but no process group is initialised.
    """
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if requested and not ready:
        raise RuntimeError("distributed=True, but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    if requested is False or not ready or dist.get_world_size() == 1:
        return None
    return dist.get_rank(), dist.get_world_size()


def shard(count: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous run of ``range(count)``; run lengths differ by at most one."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def pairs_signature(views: Sequence[Tuple[ImageView, ImageView]]) -> str:
    """A digest of the pair list's shapes, dtypes and true shapes (equal on every rank that holds the same pairs)."""
    digest = hashlib.sha256()
    for pair in views:
        for view in pair:
            digest.update(repr((tuple(view.img.shape), str(view.img.dtype), view.true_shape_rows)).encode())
    return f"{len(views)} pairs, sha256 {digest.hexdigest()[:16]}"


def check_same_pairs(signature: str) -> None:
    """Raise unless every rank passed a pair list with the same ``signature``.

    Raises:
        RuntimeError: naming the ranks whose pairs differ from rank 0's.
    """
    import torch.distributed as dist

    signatures: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(signatures, signature)
    different = [rank for rank, s in enumerate(signatures) if s != signatures[0]]
    if different:
        raise RuntimeError(f"fastpatch.inference under torch.distributed needs the same pairs on every rank; "
                           f"rank 0 has {signatures[0]} but ranks {different} have "
                           f"{[signatures[r] for r in different]} (pass distributed=False to run each rank alone)")


def gather_in_order(local: list) -> list:
    """Every rank's ``local`` list, concatenated in rank order, on every rank."""
    import torch.distributed as dist

    parts: List[Optional[list]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


"""Launch-grid arithmetic shared by the launchers (plain Python: ``triton.cdiv`` is a Triton
callable in recent versions and costs microseconds of host time per call)."""
from __future__ import annotations

__all__ = ["cdiv"]


def cdiv(n: int, block: int) -> int:
    """ceil(n / block) for non-negative ``n`` and positive ``block``: programs along one grid axis."""
    return -(-n // block)

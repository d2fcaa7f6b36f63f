"""Progress of the pair engine: a tqdm bar when tqdm is installed, a plain line otherwise."""
from __future__ import annotations

import sys
from typing import Optional

__all__ = ["Progress"]


def _tqdm_class():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """Counts ``total`` steps named ``desc``; silent when not ``enabled``.

    With tqdm: a bar on stderr. Without: one line on stdout, rewritten in place (``\\r``) as steps
    complete and ended with a newline by :meth:`close`.
    """

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.done = total, desc, enabled, 0
        tqdm = _tqdm_class() if enabled else None
        self._bar: Optional[object] = tqdm(total=total, desc=desc, unit="") if tqdm is not None else None
        if enabled and self._bar is None:
            self._line()

    def _line(self) -> None:
        sys.stdout.write(f"\r{self.desc}: {self.done}/{self.total}")
        sys.stdout.flush()

    def update(self, steps: int) -> None:
        self.done += steps
        if self._bar is not None:
            self._bar.update(steps)
        elif self.enabled:
            self._line()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

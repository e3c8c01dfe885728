"""Progress display: one place that decides how bars look and where they go.

On a terminal: a tqdm bar. In logs and CI (stderr not a terminal): a plain
line every few seconds, so that logs stay readable and an error message always
starts on its own line.

In a distributed run (``torchrun``) only rank 0 shows progress and says
anything; the other ranks are silent.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm

from core import distributed


class _LineProgress:
    """tqdm's update/set_postfix/close subset, printing whole lines."""

    def __init__(self, total: int | None, desc: str, unit: str, every: float = 10.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n, self.t0, self.last, self.postfix = 0, time.perf_counter(), 0.0, ""

    def __enter__(self) -> _LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self._line()
            self._printed = self.n

    def set_postfix(self, postfix: dict[str, Any] | None = None, **kw: Any) -> None:
        items = {**(postfix or {}), **kw}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def _line(self) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        total = f"/{self.total}" if self.total else ""
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}{total} {self.unit} ({self.n / dt:.2f} {self.unit}/s){extra}",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.n != getattr(self, "_printed", None):
            self._printed = self.n
            self._line()


class _Silent:
    """A bar that shows nothing (the ranks other than 0 of a distributed run)."""

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, postfix: dict[str, Any] | None = None, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int | None, desc: str, unit: str = "it", **kwargs: Any) -> Any:
    """A progress bar on stderr (a tqdm bar on a terminal, plain lines otherwise)."""
    if not distributed.is_main():
        return _Silent()
    if not sys.stderr.isatty():
        return _LineProgress(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.2, leave=True, **kwargs)


def say(message: str) -> None:
    """A line for the user, on stderr so stdout stays machine-readable (rank 0 alone)."""
    if not distributed.is_main():
        return
    print(message, file=sys.stderr, flush=True)

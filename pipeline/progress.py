"""Progress display: one place that decides how bars look and where they go."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress(total: int | None, desc: str, unit: str = "it", **kwargs: Any) -> tqdm:
    """A progress bar on stderr, refreshed at most once a second when not a terminal."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.2 if interactive else 5.0, leave=True, **kwargs)


def say(message: str) -> None:
    """A line for the user, on stderr so stdout stays machine-readable."""
    print(message, file=sys.stderr, flush=True)

"""File idioms used everywhere: write to a temporary name, then rename; seeds.

A file that exists under its final name is complete: every writer goes
through ``write_atomic`` (text/bytes) or ``save_torch_atomic`` (checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np


def temp_name(path: Path) -> Path:
    """The hidden temporary sibling a writer of ``path`` uses (per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_with(path: Path, write: Callable[[IO[bytes]], None], fsync: bool = False) -> None:
    """Call ``write(fh)`` on a temporary file, optionally fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write text or bytes to ``path`` atomically."""
    data = text.encode() if isinstance(text, str) else text
    write_with(path, lambda fh: fh.write(data))


def save_torch_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary name, fsync, then rename (checkpoints)."""
    import torch

    write_with(path, lambda fh: torch.save(obj, fh), fsync=True)


def read_json(path: Path) -> Any:
    """The parsed JSON file, or None when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def seed_from(*parts: object) -> int:
    """A 63-bit seed from any tuple of parts (stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") % (2**63)


def seeded(seed: int, *parts: object) -> np.random.Generator:
    """A numpy generator seeded by (seed, *parts)."""
    digest = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))

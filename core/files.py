"""File idioms used everywhere: write to a temporary name, then rename; seeds.

A file that exists under its final name is complete: every writer goes
through ``write_atomic`` (text/bytes) or ``save_torch_atomic`` (checkpoints).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from core.errors import CladError


def temp_name(path: Path) -> Path:
    """The hidden temporary sibling a writer of ``path`` uses (per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


TEMP_PATTERN = re.compile(r"^\..+\.tmp-(\d+)(\.[A-Za-z0-9]+)?$")  # every writer's hidden temporary name


def _out_of_space(exc: BaseException, where: Path) -> bool:
    """Did this write fail for lack of space? (torch.save reports ENOSPC only as an
    'enforce fail at inline_container.cc' RuntimeError, so also look at the disk.)"""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, (OSError, RuntimeError)):
        try:
            return shutil.disk_usage(where).free < 2**20
        except OSError:
            return False
    return False


def write_with(path: Path, write: Callable[[IO[bytes]], None], fsync: bool = False) -> None:
    """Call ``write(fh)`` on a temporary file, optionally fsync, then rename over ``path``.

    On any failure the temporary file is removed; a full disk becomes one
    line saying how much was being written, where, and what to do.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if _out_of_space(exc, path.parent):
            need = max(written, path.stat().st_size if path.exists() else 0)
            free = shutil.disk_usage(path.parent).free
            raise CladError(f"no space left on the device writing {path} (needs at least {need / 2**20:.1f} MiB, "
                            f"{free / 2**20:.1f} MiB free there); free space and run the same command again: "
                            "it continues where it stopped") from None
        raise


def remove_stale_temps(root: Path) -> list[Path]:
    """Remove the hidden temporary files under ``root`` whose writer process is gone
    (left by kill -9 or a crash; they can be large). Returns what was removed."""
    removed = []
    for p in Path(root).rglob(".*.tmp-*"):
        m = TEMP_PATTERN.match(p.name)
        if m is None or not p.is_file():
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


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

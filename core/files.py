"""File idioms used everywhere: write to a temporary name, then rename; seeds.

A file that exists under its final name is complete: every writer goes
through ``write_atomic`` (text/bytes) or ``save_torch_atomic`` (checkpoints).
"""

from __future__ import annotations

import errno
import glob
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


TEMP_PATTERN = re.compile(r"^\..+\.(?:tmp|old)-(\d+)(\.[A-Za-z0-9]+)?$")  # every writer's hidden temporary name


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(root: Path, recursive: bool = True, of: str = "") -> list[Path]:
    """Remove the hidden temporaries under ``root`` (files, and folders such as
    ``.eval.tmp-PID`` or ``.scores.old-PID``) whose writer process is gone (left
    by kill -9 or a crash; they can be large). ``recursive=False`` looks at
    ``root``'s own entries only; ``of`` keeps to the temporaries of that one name
    (in a user's folder, nothing else is touched). Returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    find = root.rglob if recursive else root.glob
    name = glob.escape(of) if of else "*"
    found = sorted(set(find(f".{name}.tmp-*")) | set(find(f".{name}.old-*")))
    removed: list[Path] = []
    for p in found:
        m = TEMP_PATTERN.match(p.name)
        if m is None or any(r in p.parents for r in removed) or _alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() or p.is_symlink():
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p)
    return removed


def temp_dir(final: Path) -> Path:
    """A fresh hidden sibling folder ``.NAME.tmp-PID`` to build ``final`` in
    (see ``swap_into_place``); dead processes' ones are removed first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent, recursive=False, of=final.name)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def swap_into_place(tmp: Path, final: Path) -> None:
    """Replace the folder ``final`` by the finished folder ``tmp`` (two renames):
    a reader, or a kill at any moment, sees the old folder whole or the new one
    whole, never a mix; an old copy left by a kill is ``.NAME.old-PID``."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write text or bytes to ``path`` atomically."""
    data = text.encode() if isinstance(text, str) else text
    write_with(path, lambda fh: fh.write(data))


def save_torch_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary name, fsync, then rename (checkpoints)."""
    import torch

    write_with(path, lambda fh: torch.save(obj, fh), fsync=True)


def load_safely(path: Path, what: str, fix: str) -> Any:
    """``torch.load(path, weights_only=True)``; a file that is not a plain
    tensor pickle (a pickle with code, a PNG, a truncated file) is one line
    naming it, ``what`` it should be and ``fix``. Never retried with
    ``weights_only=False``: that would run whatever code the file holds."""
    import pickle
    import zipfile

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError,
            AttributeError, TypeError, UnicodeDecodeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        why = "it holds code or objects other than tensors" if isinstance(exc, pickle.UnpicklingError) \
            else f"{type(exc).__name__}: {first[:100]}"
        raise CladError(f"{path}: not {what} that can be loaded safely ({why}); {fix}") from None


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

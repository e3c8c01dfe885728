"""The output folder as one whole scoring: built in a hidden sibling, then swapped in.

A killed ``clad-run`` (kill -9 included) leaves ``--out`` as it was before,
never a mix of old and new heat maps with a table that names neither; the
next run removes the dead run's temporary folder. The same two renames as
``core.files.temp_dir`` / ``swap_into_place`` on the training side, written
again here because the runtime imports nothing of the training stack.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temps(final: Path) -> None:
    """Remove ``.NAME.tmp-PID`` / ``.NAME.old-PID`` siblings of ``final`` whose process is gone."""
    if not final.parent.is_dir():
        return
    for p in final.parent.glob(f".{final.name}.*-*"):
        kind, _, pid = p.name[len(final.name) + 2:].rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def temp_dir(final: Path) -> Path:
    """A fresh hidden sibling ``.NAME.tmp-PID`` to build ``final`` in."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def swap_into_place(tmp: Path, final: Path) -> None:
    """Replace the folder ``final`` by the finished ``tmp`` (two renames)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

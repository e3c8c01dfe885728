"""Workspace locks: two clad processes never work on one stage of one workspace at once.

A lock is an exclusive ``fcntl.flock`` on a file under ``WORK/.locks/``. The
operating system releases it when the holder exits, however it exits
(kill -9 included), so a crash never leaves a stale lock behind: the file
may stay, the lock does not. The second process waits, saying for whom,
and then finds the work done (or continues it) as a re-run would.
Extraction has one lock per workspace; train, calibrate, evaluate and score
one per run.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path


@contextmanager
def held(path: Path, what: str, say: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock file ``path`` for ``what`` (waiting, with one message, while another process holds it)."""
    if not path.parent.parent.is_dir():  # no workspace here: the command itself says so
        yield
        return
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            say(f"{what}: waiting for another clad process (pid {holder}) working on the same "
                f"{'workspace' if 'extract' in path.name else 'run'} ({path.name})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def extract_lock(work: Path, say: Callable[[str], None]) -> AbstractContextManager[None]:
    """The workspace's extraction lock."""
    return held(Path(work) / ".locks" / "extract.lock", "extract", say)


def run_lock(work: Path, run: str, what: str, say: Callable[[str], None]) -> AbstractContextManager[None]:
    """The lock of run ``run`` (train, calibrate, evaluate, score)."""
    return held(Path(work) / ".locks" / f"run-{run}.lock", what, say)


def running(path: Path) -> str:
    """The pid (as written) of a process holding the lock file ``path`` now, "" if none.
    Probes with a shared, non-blocking lock released at once (status never waits)."""
    if not path.is_file():
        return ""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return ""
    finally:
        os.close(fd)


def extraction_running(work: Path) -> str:
    """The pid of a 'clad extract' working on ``work`` now ("" if none)."""
    return running(Path(work) / ".locks" / "extract.lock")

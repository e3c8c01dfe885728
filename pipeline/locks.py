"""Workspace locks: two clad processes never work on one stage of one workspace at once.

A lock is an exclusive ``fcntl.flock`` on a file under ``WORK/.locks/``. The
operating system releases it when the holder exits, however it exits
(kill -9 included), so a crash never leaves a stale lock behind: the file
may stay, the lock does not. The second process waits, saying for whom,
and then finds the work done (or continues it) as a re-run would.
Extraction has one lock per workspace; train, calibrate, evaluate and score
one per run. The feature cache has a shared/exclusive lock: train, calibrate
and evaluate read it under a shared lock, ``clad extract --rebuild`` (which
deletes it) takes it exclusively, so a rebuild waits for the readers and
readers wait for a rebuild. Order: run lock, then cache lock; extraction
lock, then cache lock (never the other way round: no deadlock).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path


@contextmanager
def held(path: Path, what: str, say: Callable[[str], None], shared: bool = False, doing: str = "") -> Iterator[None]:
    """Hold the lock file ``path`` for ``what`` (waiting, with one message, while another
    process holds it). ``shared``: any number of shared holders at once, none while an
    exclusive one holds it; ``doing`` says what the holders being waited for do."""
    if not path.parent.parent.is_dir():  # no workspace here: the command itself says so
        yield
        return
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            say(f"{what}: waiting for another clad process (pid {holder}) "
                + (doing or f"working on the same {'workspace' if 'extract' in path.name else 'run'}")
                + f" ({path.name})")
            fcntl.flock(fd, mode)
        if not shared:  # shared holders never truncate (another may be reading); each writes its pid padded,
            os.ftruncate(fd, 0)  # so a waiter names the latest of them
        os.pwrite(fd, f"{os.getpid():<12}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def extract_lock(work: Path, say: Callable[[str], None]) -> AbstractContextManager[None]:
    """The workspace's extraction lock."""
    return held(Path(work) / ".locks" / "extract.lock", "extract", say)


def cache_read_lock(work: Path, what: str, say: Callable[[str], None]) -> AbstractContextManager[None]:
    """Shared lock on the feature cache: held by train, calibrate, evaluate and score while
    they read it; any number at once, none while a rebuild holds it exclusively."""
    return held(Path(work) / ".locks" / "cache.lock", what, say, shared=True,
                doing="rebuilding the feature cache ('clad extract --rebuild')")


def cache_rebuild_lock(work: Path, say: Callable[[str], None]) -> AbstractContextManager[None]:
    """Exclusive lock on the feature cache: ``clad extract --rebuild`` deletes it, so it
    waits for every reader to finish, and readers wait for it."""
    return held(Path(work) / ".locks" / "cache.lock", "extract --rebuild", say,
                doing="reading the feature cache (train, calibrate or evaluate) to finish")


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

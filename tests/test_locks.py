"""Two clad processes on one workspace: the second waits for the first, nothing is done twice or corrupted.

The test holds the lock itself while it starts two real clad processes, so both
must wait whatever the timing (a tiny knn run trains faster than a second
Python process starts), then releases it: one does the work, the other finds
it done.
"""

import subprocess
import time

from pipeline.locks import extract_lock, run_lock
from tests.conftest import CLAD, ROOT, clad, set_config


def _start(log, *args):
    return subprocess.Popen(CLAD + list(args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"),
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"})


def _both_wait_then_finish(lock, tmp_path, *args) -> str:
    """Start two ``clad ARGS`` while ``lock`` is held here; both must say they wait; returns their stderr."""
    logs = [tmp_path / f"{args[0]}-{i}.err" for i in (1, 2)]
    with lock:
        procs = [_start(log, *args) for log in logs]
        deadline = time.time() + 300
        while time.time() < deadline and not all("waiting for another clad process" in log.read_text()
                                                  for log in logs):
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            time.sleep(0.1)
    codes = [p.wait(timeout=600) for p in procs]
    stderr = [log.read_text() for log in logs]
    assert codes == [0, 0], stderr
    assert all("waiting for another clad process" in s for s in stderr) and "Traceback" not in "".join(stderr)
    return "".join(stderr)


def test_concurrent_extract_and_train_wait_for_each_other(tiny_data, tmp_path):
    work = tmp_path / "work"
    clad("init", str(work), "--data", str(tiny_data))
    set_config(work, features={"shard_images": 3})
    stderr = _both_wait_then_finish(extract_lock(work, print), tmp_path, "extract", str(work))
    assert stderr.count("already done") == 1  # one extracted, the other found the work finished
    assert "done" in clad("status", str(work)).stdout.splitlines()[0]

    stderr = _both_wait_then_finish(run_lock(work, "same", "test", print), tmp_path,
                                    "train", str(work), "--run", "same", "--head", "knn")
    assert stderr.count("train: done in") == 1  # trained once; the other found it finished
    assert "already trained" in stderr


def _waits_while_held(lock, tmp_path, name, *args, check=None):
    """Start ``clad ARGS`` while this process holds ``lock``; it must say it waits (and
    ``check()`` must hold while it does); after the release it finishes. Returns its stderr."""
    log = tmp_path / f"{name}.err"
    with lock:
        proc = _start(log, *args)
        deadline = time.time() + 300
        while time.time() < deadline and "waiting for another clad process" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        time.sleep(1.0)
        assert proc.poll() is None, log.read_text()  # still waiting
        if check:
            check()
    assert proc.wait(timeout=600) == 0, log.read_text()
    return log.read_text()


def test_rebuild_waits_for_readers_and_readers_wait_for_a_rebuild(trained, tmp_path):
    import shutil

    from pipeline.locks import cache_read_lock, cache_rebuild_lock

    work = tmp_path / "w"
    shutil.copytree(trained, work)
    # a rebuild in progress (held here, exclusively): evaluate waits for it instead of reading a cache being deleted
    err = _waits_while_held(cache_rebuild_lock(work, print), tmp_path, "evaluate", "evaluate", str(work), "--run", "t")
    assert "rebuilding the feature cache" in err and (work / "runs" / "t" / "eval" / "metrics.json").is_file()
    # a reader at work (held here, shared): the rebuild waits, and deletes nothing meanwhile
    shards = sorted(p.name for p in (work / "cache" / "train.zarr" / "shards").iterdir())

    def untouched():
        assert sorted(p.name for p in (work / "cache" / "train.zarr" / "shards").iterdir()) == shards

    err = _waits_while_held(cache_read_lock(work, "test", print), tmp_path, "rebuild", "extract", str(work),
                            "--rebuild", check=untouched)
    assert "reading the feature cache" in err and "Traceback" not in err
    assert "done" in clad("status", str(work)).stdout.splitlines()[0]

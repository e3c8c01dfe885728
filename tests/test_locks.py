"""Two clad processes on one workspace: the second waits for the first, nothing is done twice or corrupted."""

import subprocess

from tests.conftest import CLAD, ROOT, clad, set_config


def _start(*args):
    return subprocess.Popen(CLAD + list(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"})


def test_concurrent_extract_and_train_wait_for_each_other(tiny_data, tmp_path):
    work = tmp_path / "work"
    clad("init", str(work), "--data", str(tiny_data))
    set_config(work, features={"shard_images": 3})
    first, second = _start("extract", str(work)), _start("extract", str(work))
    out = [p.communicate(timeout=600) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, out
    stderr = out[0][1] + out[1][1]
    assert "waiting for another clad process" in stderr and "Traceback" not in stderr
    assert "already done" in stderr  # the second found the work finished
    assert "done" in clad("status", str(work)).stdout.splitlines()[0]

    first = _start("train", str(work), "--run", "same", "--head", "knn")
    second = _start("train", str(work), "--run", "same", "--head", "knn")
    out = [p.communicate(timeout=600) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, out
    stderr = out[0][1] + out[1][1]
    assert "waiting for another clad process" in stderr
    assert stderr.count("train: done in") == 1  # trained once; the other found it finished

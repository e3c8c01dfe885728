"""Round two of 'nothing silent': the workspace never carries on with outdated or mixed results."""

import json
import shutil

from tests.conftest import clad, set_config


def _status(work):
    return {s["stage"]: s for s in json.loads(clad("status", str(work), "--json").stdout)}


def _one_line(res):
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    return lines[-1]


def test_images_added_after_extraction_make_the_cache_stale(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    work = tmp_path / "work"
    clad("init", str(work), "--data", str(data))
    set_config(work, features={"shard_images": 4})
    clad("extract", str(work))
    clad("train", str(work), "--run", "k", "--head", "knn")
    assert _status(work)["extract"]["state"] == "done"
    good = data / "washer" / "train" / "good"
    first = sorted(good.glob("*.png"))[0]
    shutil.copy(first, good / "new_1.png")
    shutil.copy(first, good / "new_2.png")
    st = _status(work)
    assert st["extract"]["state"] == "stale", st["extract"]
    assert "2 image(s) added" in st["extract"]["detail"] and "clad extract WORK --rebuild" in st["extract"]["detail"]
    assert st["train[k]"]["state"] == "stale"
    line = _one_line(clad("train", str(work), "--run", "k2", "--head", "knn", check=False))
    assert "2 image(s) added" in line and "--rebuild" in line
    line = _one_line(clad("evaluate", str(work), "--run", "k", check=False))
    assert "2 image(s) added" in line
    (good / "new_1.png").unlink()
    (good / "new_2.png").unlink()
    first.unlink()
    assert "1 image(s) removed" in _status(work)["extract"]["detail"]
    line = _one_line(clad("extract", str(work), check=False))
    assert "data set changed since extraction" in line and "--rebuild" in line
    clad("extract", str(work), "--rebuild")
    assert _status(work)["extract"]["state"] == "done"

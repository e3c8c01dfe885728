"""Round two of 'nothing silent': the workspace never carries on with outdated or mixed results."""

import json
import shutil
from pathlib import Path

import pytest

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


def _inputs(tiny_data, folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    src = sorted(tiny_data.rglob("test/*/*.png"))
    for i in range(n):
        shutil.copy(src[i % len(src)], folder / f"img{i:03d}.png")
    return folder


def _consistent(out):
    """results.csv names exactly the heat maps in the folder; no temporaries beside or inside it."""
    import csv

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(Path(r["heatmap"]).name for r in rows) == sorted(p.name for p in out.glob("*.png"))
    assert all(Path(r["heatmap"]).parent == out for r in rows)
    left = [p for p in out.parent.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not left, left
    return rows


def test_score_out_is_one_whole_scoring_even_after_kill_9(trained, tiny_data, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import CLAD, ROOT

    out = tmp_path / "res" / "out"
    clad("score", str(trained), "--run", "t", str(_inputs(tiny_data, tmp_path / "few", 3)), "--out", str(out))
    assert len(_consistent(out)) == 3
    many = _inputs(tiny_data, tmp_path / "many", 40)
    args = ["score", str(trained), "--run", "t", str(many), "--out", str(out)]
    proc = subprocess.Popen(CLAD + args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list((tmp_path / "res").rglob("00006_*.png")):
        time.sleep(0.05)
    assert proc.poll() is None, "scoring finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # killed mid-way: the folder still holds the previous scoring, whole
    rows = list(csv_rows(out))
    assert len(rows) == 3 and sorted(p.name for p in out.glob("*.png")) == sorted(
        Path(r["heatmap"]).name for r in rows)
    res = clad(*args)
    assert "left by an interrupted process" in res.stderr
    assert len(_consistent(out)) == 40


def csv_rows(out):
    import csv

    return csv.DictReader((out / "results.csv").open())


def test_score_out_inside_an_input_folder_is_not_scored_again(trained, tiny_data, tmp_path):
    folder = _inputs(tiny_data, tmp_path / "in", 3)
    out = folder / "out"
    clad("score", str(trained), "--run", "t", str(folder), "--out", str(out))
    res = clad("score", str(trained), "--run", "t", str(folder), "--out", str(out))
    assert len(_consistent(out)) == 3  # not 6: its own heat maps are not inputs
    assert "skipped 3 image(s) inside the output folder" in res.stderr


def test_score_out_that_is_a_file_or_a_foreign_folder_is_one_line(trained, tiny_data, tmp_path):
    folder = _inputs(tiny_data, tmp_path / "in", 1)
    (tmp_path / "taken.csv").write_text("mine")
    line = _one_line(clad("score", str(trained), "--run", "t", str(folder), "--out", str(tmp_path / "taken.csv"),
                          check=False))
    assert "taken.csv: is a file, not a folder" in line
    # a folder of the user's own files is never replaced by a scoring (the input folder itself, say)
    line = _one_line(clad("score", str(trained), "--run", "t", str(folder), "--out", str(folder), check=False))
    assert "not an earlier 'clad score' output" in line
    assert (folder / "img000.png").is_file() and (tmp_path / "taken.csv").read_text() == "mine"


def test_evaluate_removes_temporaries_of_a_killed_evaluation(trained, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(trained, work)
    dead = work / "runs" / "t" / ".eval.tmp-999999999"  # no such process
    (dead / "figures").mkdir(parents=True)
    (dead / "figures" / "x.png").write_bytes(b"x" * 1000)
    res = clad("evaluate", str(work), "--run", "t")
    assert not dead.exists() and "left by an interrupted evaluation" in res.stderr
    assert (work / "runs" / "t" / "eval" / "metrics.json").is_file()


def test_a_partial_cache_says_whether_an_extraction_is_running(extracted, tmp_path):
    import os

    from pipeline.locks import extract_lock

    work = tmp_path / "w"
    shutil.copytree(extracted, work)
    shutil.rmtree(work / "cache" / "test.zarr" / "shards" / "00001")  # as if a run stopped before it
    st = _status(work)["extract"]
    assert st["state"] == "partial" and "no extraction is running" in st["detail"]
    assert "run 'clad extract WORK' to finish" in st["detail"]
    with extract_lock(work, print):  # an extraction at work (this process holds its lock)
        st = _status(work)["extract"]
        assert f"an extraction is running (pid {os.getpid()}): wait for it to finish" in st["detail"]
        line = _one_line(clad("train", str(work), "--run", "x", "--head", "knn", check=False))
        assert "feature cache is partial" in line and "an extraction is running" in line


@pytest.mark.parametrize("alloc", ["torch_cpu", "numpy", "cuda"])
def test_out_of_memory_in_training_is_one_line_naming_the_batch_settings(extracted, tmp_path, monkeypatch, alloc):
    import numpy as np
    import torch
    from click.testing import CliRunner

    from pipeline.cli import main
    from stages.heads import head_class

    def fit(cls, settings, ctx):  # the allocation a too-large batch makes, with the real exception it raises
        if alloc == "torch_cpu":
            torch.empty(10**14)  # RuntimeError: DefaultCPUAllocator: can't allocate memory
        elif alloc == "numpy":
            np.empty(10**14)  # numpy's _ArrayMemoryError, a MemoryError
        else:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 372.53 GiB")
        raise AssertionError("allocated 800 TB")

    work = tmp_path / "w"
    shutil.copytree(extracted, work)
    monkeypatch.setattr(head_class("clad"), "fit", classmethod(fit))
    res = CliRunner().invoke(main, ["train", str(work), "--run", "oom", "--head", "clad",
                                    "--set", "batch_finetune=100000000"])
    assert res.exit_code == 2, res.output
    line = res.output.strip().splitlines()[-1]
    assert "out of memory" in line and "batch_finetune = 100000000" in line and "batch_contrastive" in line
    assert "--set batch_finetune=25000000" in line and "Traceback" not in res.output


def test_a_bug_in_training_keeps_its_traceback(extracted, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import main
    from stages.heads import head_class

    def fit(cls, settings, ctx):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    work = tmp_path / "w"
    shutil.copytree(extracted, work)
    monkeypatch.setattr(head_class("clad"), "fit", classmethod(fit))
    res = CliRunner().invoke(main, ["train", str(work), "--run", "bug", "--head", "clad"])
    assert isinstance(res.exception, RuntimeError) and "shapes" in str(res.exception)

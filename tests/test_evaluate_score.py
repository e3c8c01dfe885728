"""Evaluation outputs, status bookkeeping and scoring new images, through the real CLI."""

import csv
import json
import shutil

import numpy as np
from PIL import Image

from tests.conftest import clad, set_config


def _png_ok(path):
    with Image.open(path) as im:
        im.load()
        return im.size[0] > 100


def test_evaluate_writes_metrics_report_and_pictures(trained):
    res = clad("evaluate", str(trained), "--run", "t")
    ev = trained / "runs" / "t" / "eval"
    m = json.loads((ev / "metrics.json").read_text())
    assert set(m["per_class"]) == {"washer", "weave"}
    for c in m["per_class"].values():
        assert 0 <= c["image_auroc"] <= 1 and 0 <= c["pixel_auroc"] <= 1 and 0 <= c["aupro"] <= 1
    assert m["mean"]["pixel_auroc"] == np.mean([c["pixel_auroc"] for c in m["per_class"].values()])
    assert "no test-set selection" in m["protocol"]
    rows = list(csv.reader((ev / "metrics.csv").open()))
    assert rows[0][0] == "class" and rows[-1][0] == "mean"
    report = (ev / "report.md").read_text()
    assert "| **mean** |" in report and "figures/curves_washer.png" in report
    figs = sorted((ev / "figures").glob("*.png"))
    assert any(f.name.startswith("curves_") for f in figs) and len(figs) >= 8
    assert all(_png_ok(f) for f in figs[:4])
    assert "| washer |" in res.stdout
    again = clad("evaluate", str(trained), "--run", "t")
    assert "already evaluated" in again.stderr


def test_status_done_then_stale_after_edits(trained, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(trained, work)
    clad("evaluate", str(work), "--run", "t")
    clad("train", str(work), "--run", "nn", "--head", "knn")
    st = {s["stage"]: s for s in json.loads(clad("status", str(work), "--json").stdout)}
    assert st["extract"]["state"] == "done" and st["train[t]"]["state"] == "done"
    assert st["train[nn]"]["state"] == "done"
    assert st["evaluate[t]"]["state"] == "done"
    assert st["calibrate[t]"]["state"] == "done"
    set_config(work, evaluate={"sigma": 2.0})  # evaluation setting: calibration and evaluation go stale
    st = {s["stage"]: s for s in json.loads(clad("status", str(work), "--json").stdout)}
    assert st["train[t]"]["state"] == "done" and st["evaluate[t]"]["state"] == "stale"
    assert st["calibrate[t]"]["state"] == "stale"  # thresholds were taken on maps of the old sigma
    res = clad("score", str(work), "--run", "t", str(work.parent), check=False)
    assert res.returncode != 0 and "clad calibrate" in res.stderr  # never judged with stale thresholds
    clad("calibrate", str(work), "--run", "t")
    st = {s["stage"]: s for s in json.loads(clad("status", str(work), "--json").stdout)}
    assert st["calibrate[t]"]["state"] == "done" and st["evaluate[t]"]["state"] == "stale"
    set_config(work, train={"margin": 2.0})  # training setting: training and evaluation stale
    st = {s["stage"]: s for s in json.loads(clad("status", str(work), "--json").stdout)}
    assert st["extract"]["state"] == "done" and st["train[t]"]["state"] == "stale"
    assert "margin" in st["train[t]"]["detail"]
    assert st["train[nn]"]["state"] == "done"  # a CLAD setting leaves the knn head current
    set_config(work, train={"margin": 2.0, "knn_k": 3})  # ... a knn setting does not
    st = {s["stage"]: s for s in json.loads(clad("status", str(work), "--json").stdout)}
    assert st["train[nn]"]["state"] == "stale" and "knn_k" in st["train[nn]"]["detail"]
    res = clad("evaluate", str(work), "--run", "t", check=False)
    assert res.returncode != 0 and "stale" in res.stderr
    set_config(work, features={"crop": 192})  # feature setting: everything stale
    st = {s["stage"]: s for s in json.loads(clad("status", str(work), "--json").stdout)}
    assert st["extract"]["state"] == "stale" and "features.crop" in st["extract"]["detail"]


def test_score_new_images_skips_unreadable(trained, tiny_data, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for p in sorted((tiny_data / "washer" / "test").rglob("*.png"))[:3]:
        shutil.copy(p, folder / f"{p.parent.name}_{p.name}")
    (folder / "broken.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "out"
    res = clad("score", str(trained), "--run", "t", str(folder), "--out", str(out))
    assert "broken.png" in res.stderr and "1 unreadable" in res.stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4
    scored = [r for r in rows if r["verdict"] != "unreadable"]
    assert len(scored) == 3 and all(_png_ok(r["heatmap"]) for r in scored)
    data = json.loads((out / "results.json").read_text())
    assert np.isfinite(data["thresholds"]["washer"]) and data["threshold_from"]["washer"] == "calibrated"
    # no folder names a class here: the run predicts it
    assert all(r["class"] == "washer" and r["class_from"] == "predicted" for r in scored)
    assert all(r["verdict"] == ("anomalous" if float(r["score"]) > float(r["threshold"]) else "normal")
               for r in scored)
    assert all((float(r["normalized"]) > 0.5) == (r["verdict"] == "anomalous") for r in scored)
    assert "washer: " in res.stderr  # per-class counts

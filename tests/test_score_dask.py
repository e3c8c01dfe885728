"""``clad score --scheduler local`` (issue 22): the images spread over a Dask LocalCluster's
worker processes give the results of an in-process run: the same rows of results.csv in the
same order, the same heat-map names, scores equal to float32 rounding."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from tests.conftest import clad


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_score_on_a_local_dask_cluster_equals_in_process(extracted, tiny_data, tmp_path):
    clad("train", str(extracted), "--run", "dask-rk", "--head", "routed_knn")
    images = tmp_path / "images"  # 20 images (two classes' test sets, twice) + one unreadable file
    for k in range(2):
        for cls in ("weave", "washer"):
            shutil.copytree(tiny_data / cls / "test", images / f"{k}" / cls)
    (images / "1" / "weave" / "broken.png").write_bytes(b"not an image")
    here, there = tmp_path / "here", tmp_path / "there"
    clad("score", str(extracted), "--run", "dask-rk", str(images), "--out", str(here), "--device", "cpu")
    res = clad("score", str(extracted), "--run", "dask-rk", str(images), "--out", str(there), "--device", "cpu",
               "--scheduler", "local", process=True)
    assert "on Dask scheduler local (2 workers)" in res.stderr and "skipped" in res.stderr
    a, b = _rows(here / "results.csv"), _rows(there / "results.csv")
    assert len(a) == len(b) == 21 and sum(r["verdict"] == "unreadable" for r in b) == 1
    for x, y in zip(a, b, strict=True):
        for field in x:
            if field == "score" and x[field]:
                assert abs(float(x[field]) - float(y[field])) <= 1e-5 * max(1.0, abs(float(x[field])))
            elif field == "heatmap" and x[field]:
                assert Path(x[field]).name == Path(y[field]).name and Path(y[field]).is_file()
            elif field != "normalized":
                assert x[field] == y[field], (field, x, y)
    assert sorted(p.name for p in here.iterdir()) == sorted(p.name for p in there.iterdir())

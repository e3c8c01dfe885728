"""Issue 20's target, checked from finished evaluations: CLAD against knn per class.

For each data set (WORK, CLAD run, knn run): per class and mean, image AUROC,
pixel AUROC and AUPRO of both runs and CLAD's margin; the target holds when
every mean is at least knn's minus 1.0 point, no class's image AUROC is below
knn's minus 3, and bottle / transistor reach the CLAD paper's image AUROC
(100.0 / 98.6, Table 1). Reads ``runs/RUN/eval/metrics.json`` and
``train.json`` (final or probe-selected models: no test-set selection).
Prints a table and writes bench-results/clad_target.json.

Usage: python benchmarks/clad_target.py WORK:CLAD_RUN:KNN_RUN [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import report  # noqa: E402

PAPER_IMAGE_AUROC = {"bottle": 100.0, "transistor": 98.6}  # CLAD paper, Table 1 (WideResNet-50)
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def _metrics(work: Path, run: str) -> dict[str, Any]:
    return json.loads((work / "runs" / run / "eval" / "metrics.json").read_text())


def _seconds(work: Path, run: str) -> float:
    d = json.loads((work / "runs" / run / "train.json").read_text())
    return float(d.get("seconds_train", float("nan")))


def compare(work: Path, clad: str, knn: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows per class and mean, and the list of target misses (empty = met)."""
    c, k = _metrics(work, clad), _metrics(work, knn)
    rows, misses = [], []
    for name in [*c["per_class"], "mean"]:
        cm = c["mean"] if name == "mean" else c["per_class"][name]
        km = k["mean"] if name == "mean" else k["per_class"][name]
        row: dict[str, Any] = {"data": work.name, "class": name}
        for m in METRICS:
            a, b = 100 * cm[m], 100 * km[m]
            row[f"clad_{m}"], row[f"knn_{m}"], row[f"d_{m}"] = round(a, 2), round(b, 2), round(a - b, 2)
            if name == "mean" and a < b - 1.0:
                misses.append(f"{work.name} mean {m} {a:.2f} < knn {b:.2f} - 1")
        if name != "mean" and row["clad_image_auroc"] < row["knn_image_auroc"] - 3:
            misses.append(f"{work.name} {name} image AUROC {row['clad_image_auroc']} < knn - 3")
        if name in PAPER_IMAGE_AUROC and len(c["per_class"]) == 1 and row["clad_image_auroc"] < PAPER_IMAGE_AUROC[name]:
            misses.append(f"{name} image AUROC {row['clad_image_auroc']} < paper {PAPER_IMAGE_AUROC[name]}")
        rows.append(row)
    rows[-1]["clad_train_s"] = round(_seconds(work, clad))
    return rows, misses


def main(specs: list[str]) -> None:
    rows, misses = [], []
    for spec in specs:
        work, clad, knn = spec.split(":")
        r, m = compare(Path(work), clad, knn)
        rows += r
        misses += m
    for r in rows:
        r.setdefault("clad_train_s", "")
    report("clad_target", rows, misses=misses)
    print("target met" if not misses else "target missed:\n  " + "\n  ".join(misses))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])

"""Rank agreement (Spearman rho) between the CutPaste probe and the test metrics, per data set.

A diagnostic only: nothing is chosen from it. Reads
bench-results/cutpaste_probe_<work>.json (benchmarks/cutpaste_probe.py, training
data only) and each run's WORK/runs/RUN/eval/metrics.json (test set).

Usage: python benchmarks/probe_agreement.py WORK...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import report  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench-results"
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def main() -> None:
    rows = []
    for work in map(Path, sys.argv[1:]):
        probe = json.loads((RESULTS / f"cutpaste_probe_{work.name}.json").read_text())["rows"]
        runs = [r["run"] for r in probe if (work / "runs" / r["run"] / "eval" / "metrics.json").is_file()]
        test = {r: json.loads((work / "runs" / r / "eval" / "metrics.json").read_text())["mean"] for r in runs}
        by_run = {r["run"]: r for r in probe}
        row = {"data": work.name, "runs": " ".join(runs)}
        for m in METRICS:
            rho = spearmanr([by_run[r][m] for r in runs], [test[r][m] for r in runs]).statistic
            row[f"rho_{m}"] = round(float(rho), 2)
        rows.append(row)
    report("probe_agreement", rows)


if __name__ == "__main__":
    main()

"""Benchmark: verdict quality of a trained run, per class (issue: verdicts).

Evaluates the run (``clad evaluate``, which calibrates first if needed) and
prints per class: class-routing accuracy, verdict recall and false-alarm
rate at the run's own thresholds, verdict F1 and the oracle F1-max, and
whether the target holds (F1 >= 0.9 x F1-max, false alarms <= 10 %,
routing >= 99 %). Test labels are used only to measure, never to choose.

Usage: python benchmarks/verdicts.py WORK RUN [NAME]   (writes bench-results/verdicts-NAME.json)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import report  # noqa: E402


def rows_of(metrics: dict) -> list[dict]:
    rows = []
    for c, m in metrics["per_class"].items():
        f1, f1max, far = m["verdict_f1"], m["image_f1_max"], m["verdict_false_alarm"]
        route = m.get("routing_accuracy", float("nan"))
        ok = f1 >= 0.9 * f1max - 1e-9 and far <= 0.10 + 1e-9 and route >= 0.99
        rows.append({"class": c, "image_auroc": 100 * m["image_auroc"], "routing_%": 100 * route,
                     "recall_%": 100 * m["verdict_recall"], "false_alarm_%": 100 * far,
                     "verdict_f1": f1, "f1_max": f1max, "f1/f1_max": f1 / f1max if f1max else float("nan"),
                     "threshold": m["threshold"], "target": "met" if ok else "missed"})
    return rows


def main() -> None:
    work, run = Path(sys.argv[1]), sys.argv[2]
    name = sys.argv[3] if len(sys.argv) > 3 else f"{work.name}-{run}"
    clad = Path(sys.executable).with_name("clad")
    subprocess.run([str(clad), "evaluate", str(work), "--run", run], check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((work / "runs" / run / "eval" / "metrics.json").read_text())
    summary = json.loads((work / "runs" / run / "train.json").read_text())
    cal = json.loads((work / "runs" / run / "calibration.json").read_text())
    rows = rows_of(metrics)
    report(f"verdicts-{name}", rows, work=str(work), run=run, head=summary.get("head"),
           calibration_source=cal["source"], quantile=cal["settings"]["quantile"])


if __name__ == "__main__":
    main()

"""The evaluation report: metrics.csv, the Markdown tables and report.md.

Pure text from an evaluation's result (``stages.evaluate.stage``); the
command line prints the same tables.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro", "aupro_ader")
VERDICT = ("verdict_recall", "verdict_false_alarm", "verdict_precision", "verdict_f1", "routing_accuracy")


def csv_table(per_class: dict[str, dict[str, float]], mean: dict[str, float]) -> str:
    """metrics.csv: one row per class and the mean, every metric of ``METRICS``."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["class", *METRICS])
    for c, m in per_class.items():
        w.writerow([c, *(f"{m[k]:.6f}" for k in METRICS)])
    w.writerow(["mean", *(f"{mean[k]:.6f}" for k in METRICS)])
    return buf.getvalue()


def metrics_table(per_class: dict[str, dict[str, float]], mean: dict[str, float]) -> str:
    """Markdown table, values in percent."""
    cols = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "image_f1_max", "pixel_ap")
    head = "| class | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    body = "".join(f"| {c} | " + " | ".join(_pct(m[k]) for k in cols) + " |\n" for c, m in per_class.items())
    return head + body + "| **mean** | " + " | ".join(f"**{_pct(mean[k])}**" for k in cols) + " |\n"


def verdict_table(per_class: dict[str, dict[str, Any]]) -> str:
    """Markdown table of the verdicts at the thresholds in force, per class."""
    head = ("| class | threshold | from | recall | false alarms | precision | F1 | F1-max (oracle) | routing |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for c, m in per_class.items():
        thr = m.get("threshold", float("nan"))
        rows.append(f"| {c} | {thr:.4g} | {m.get('threshold_from', '')} | {_pct(m.get('verdict_recall'))} | "
                    f"{_pct(m.get('verdict_false_alarm'))} | {_pct(m.get('verdict_precision'))} | "
                    f"{_pct(m.get('verdict_f1'))} | {_pct(m.get('image_f1_max'))} | "
                    f"{_pct(m.get('routing_accuracy'))} |\n")
    return head + "".join(rows)


def _pct(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def report_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Evaluation of run `{result['run']}`", "",
             f"Protocol: {result['protocol']}. Maps: bilinear to the crop size, Gaussian sigma as configured; "
             "image score = max of the map. AUPRO: exact MVTec definition, integrated to FPR 0.3 "
             "and divided by 0.3 (`aupro_ader` in metrics.csv is ADer's 200-threshold variant).", "",
             metrics_table(result["per_class"], result["mean"]), "",
             "## Verdicts at the run's own thresholds", "",
             "Each class has its own threshold, calibrated on training normals only (`calibration.json`) "
             "unless a user threshold is in force. Recall: defective test images flagged; false alarms: "
             "normal test images flagged; F1 beside the oracle F1-max (the best any threshold could do, "
             "chosen with test labels: a yardstick, never used). Routing: test images whose predicted "
             "class is their class.", "",
             verdict_table(result["per_class"]), "",
             "![verdicts](figures/verdicts.png)", "",
             "## Pictures", ""]
    for c, figs in result["figures"].items():
        lines.append(f"### {c}")
        lines.append("")
        lines += [f"![{Path(f).stem}]({f})" for f in figs[:2]]
        lines += [f"- [{Path(f).stem}]({f})" for f in figs[2:]]
        lines.append("")
    return "\n".join(lines)

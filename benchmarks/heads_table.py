"""One table of every evaluated run of several workspaces: accuracy, verdicts, training and scoring time.

Reads each ``WORK/runs/RUN/eval/metrics.json`` (means over classes, final
model, no selection on test data), ``train.json`` (training seconds) and,
where present, ``bench-results/throughput-<work>.json`` (head-alone scoring
time per image, from ``benchmarks/head_throughput.py``). Prints a markdown
table and writes bench-results/heads_table.json.

Usage: python benchmarks/heads_table.py WORK...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import report  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "bench-results"


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    rows = []
    for work in map(Path, sys.argv[1:]):
        speed = _read(RESULTS / f"throughput-{work.name}.json") or {"rows": []}
        ms = {r["run"]: r["ms_per_img"] for r in speed["rows"]}
        for run in sorted((work / "runs").iterdir()):
            metrics, train = _read(run / "eval" / "metrics.json"), _read(run / "train.json")
            if metrics is None or train is None:
                continue
            m = metrics["mean"]
            rows.append({"data": work.name, "run": run.name, "head": train.get("head", "clad"),
                         "image_auroc": round(100 * m["image_auroc"], 2),
                         "pixel_auroc": round(100 * m["pixel_auroc"], 2), "aupro": round(100 * m["aupro"], 2),
                         "verdict_f1": round(m.get("verdict_f1", float("nan")), 3),
                         "false_alarm_%": round(100 * m.get("verdict_false_alarm", float("nan")), 1),
                         "train_s": round(train.get("seconds_total", float("nan")), 1),
                         "evaluate_s": round(metrics.get("seconds", float("nan")), 1),
                         "head_ms_per_img": round(ms[run.name], 1) if run.name in ms else ""})
    report("heads_table", rows)


if __name__ == "__main__":
    main()

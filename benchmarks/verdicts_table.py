"""Summarise bench-results/verdicts-*.json (from benchmarks/verdicts.py) as one markdown table.

One row per data set and head: how many classes meet the verdict target,
the worst class's F1 / F1-max, false-alarm rate and routing accuracy, and
the classes that miss it with their numbers.

Usage: python benchmarks/verdicts_table.py [NAME...]   (default: every verdicts-*.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "bench-results"


def main() -> None:
    names = sys.argv[1:] or sorted(p.stem.removeprefix("verdicts-") for p in RESULTS.glob("verdicts-*.json"))
    print("| data set, head | classes meeting the target | worst F1 / F1-max | worst false alarms | "
          "worst routing | classes missing it (F1 / F1-max, false alarms) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        d = json.loads((RESULTS / f"verdicts-{name}.json").read_text())
        rows = d["rows"]
        met = sum(r["target"] == "met" for r in rows)
        missed = ", ".join(f"{r['class']} ({r['f1/f1_max']:.3f}, {r['false_alarm_%']:.1f} %)"
                           for r in rows if r["target"] != "met") or "-"
        print(f"| {name} | {met} / {len(rows)} | {min(r['f1/f1_max'] for r in rows):.3f} | "
              f"{max(r['false_alarm_%'] for r in rows):.1f} % | {min(r['routing_%'] for r in rows):.0f} % | {missed} |")


if __name__ == "__main__":
    main()

"""Collect the accuracy study's numbers into one markdown table (docs/RESULTS.md).

Usage: python benchmarks/collect_results.py STUDY_DIR
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

LABELS = {  # also the order of the rows
    "knn": "knn head (full bank, exact L2)",
    "knn-coreset10": "knn head (10 % greedy coreset, exact L2)",
    "gas-nn": "CLAD fast profile",
    "clad-fast": "CLAD fast profile",
    "clad-long": "CLAD long profile",
    "no-contrastive": "CLAD fast, no contrastive phase",
    "no-gas": "CLAD fast, no global synthesis (GAS)",
    "no-las": "CLAD fast, no local synthesis (LAS)",
    "bce": "CLAD fast, BCE score loss (GLASS) instead of hinge",
    "clad-pseudo": "CLAD fast, pseudo-labels (k-means, K = 2 x classes)",
}


def _order(run: Path) -> tuple[int, str]:
    names = list(LABELS)
    return (names.index(run.name) if run.name in names else len(names), run.name)


def _read(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.is_file() else None


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def collect(study: Path) -> str:
    rows = []
    for work in sorted(p for p in study.iterdir() if (p / "config.toml").is_file()):
        ext = _read(work / "cache" / "extract.json") or {}
        backbone = "lite0"
        cfg_text = (work / "config.toml").read_text()
        for b in ("lite1", "lite2"):
            if f"tf_efficientnet_{b}" in cfg_text:
                backbone = b
        runs_dir = work / "runs"
        runs = sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=_order) if runs_dir.is_dir() else []
        for run in runs:
            m = _read(run / "eval" / "metrics.json")
            t = _read(run / "train.json")
            if not m or not t:
                continue
            run_cfg = (run / "config.toml").read_text()
            gas = "off" if "use_gas = false" in run_cfg else (
                "nn" if 'gas_scale = "nn"' in run_cfg else "absolute")
            if t.get("head") == "knn":
                gas = "-"
            for cls, scope in (("bottle", "bottle"), ("__mean__", "mean")):
                if cls == "__mean__" and len(m["per_class"]) == 1:
                    continue
                vals = m["mean"] if cls == "__mean__" else m["per_class"].get(cls)
                if vals is None:
                    continue
                rows.append(f"| {work.name} | {backbone} | {LABELS.get(run.name, run.name)} | {gas} | {scope} | "
                            f"{_pct(vals['image_auroc'])} | {_pct(vals['pixel_auroc'])} | {_pct(vals['aupro'])} | "
                            f"{ext.get('seconds', float('nan')):.0f} | {t['seconds_total']:.0f} | {m['seconds']:.0f} |")
    head = ("| data | backbone | head / setting | GAS radii | scope | image AUROC | pixel AUROC | AUPRO@0.3 | "
            "extract s | train s | evaluate s |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU only"
    paper = ("| MVTec bottle (paper, Table 1) | WideResNet-50 | CLAD (paper) | - | bottle | 100.0 | 97.0 | 96.0 "
             "| - | - | - |\n")
    return head + "\n".join(rows) + "\n" + paper + f"\nMachine: {machine}.\n"


if __name__ == "__main__":
    study = Path(sys.argv[1] if len(sys.argv) > 1 else "work/study")
    text = collect(study)
    (study / "results.md").write_text(text)
    print(text)

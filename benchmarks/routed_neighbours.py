"""How many neighbour images should the routed knn head search, chosen by which rule? Training data only.

For a seeded sample of training images per class, each image is scored
leave-one-out (its own rows removed from the bank) by the routed knn head
with ``images`` = 4, 8, 16, 32, 64 and 0 (the whole class: exact knn within
the class), the neighbour images chosen by each ``select`` rule (``cells``:
4 x 4 local-appearance cells; ``mean``: whole-image mean feature), searched
exactly or, for a run with ``project`` > 0, by its projected candidates.
The table gives how far each setting's patch scores and image
scores (max over patches) sit above the whole-class scores: the error that
searching fewer images adds on normal data, where it turns into false alarms
and lower pixel AUROC. No test image is read.

Usage: python benchmarks/routed_neighbours.py WORK RUN [--per-class 10]   (RUN: a routed_knn run with select = cells)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import progress_row, report  # noqa: E402
from core.files import seeded  # noqa: E402
from stages.heads import load_trained_head  # noqa: E402

SETTINGS = (4, 8, 16, 32, 64, 0)
RULES = ("cells", "mean")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("run")
    ap.add_argument("--per-class", type=int, default=10)
    a = ap.parse_args()
    head, _ = load_trained_head(a.work / "runs" / a.run / "checkpoints" / "final.pt", torch.device("cpu"))
    if getattr(head, "cells", None) is None:
        raise SystemExit(f"{a.run}: not a routed_knn run with select = cells (train one: --head routed_knn)")
    sample = np.concatenate([seeded(0, "routed-neighbours", int(c)).permutation(np.nonzero(head.desc_class == c)[0])
                             [:a.per_class] for c in np.unique(head.desc_class)])
    cases = [(r, n, 0, 0.0) for r in RULES for n in SETTINGS if n or r == RULES[0]]
    if head.settings.project:  # the run's candidate search (project, rerank), then with its refinement
        cases += [("cells", n, head.settings.project, f) for f in sorted({0.0, head.settings.refine})
                  for n in SETTINGS if n]
    scores: dict[tuple[str, int, int, float], list[np.ndarray]] = {c: [] for c in cases}
    seconds = dict.fromkeys(cases, 0.0)
    base = head.settings
    for j in sample:
        x = head.rows[head.offsets[j]:head.offsets[j + 1]]
        allowed = np.ones(len(head.desc), bool)
        allowed[j] = False
        for r, n, d, f in cases:
            head.settings = dataclasses.replace(base, images=n, select=r, project=d, refine=f)
            t0 = time.perf_counter()
            scores[r, n, d, f].append(head._score_one(x, allowed))
            seconds[r, n, d, f] += time.perf_counter() - t0
    exact = np.stack(scores[RULES[0], 0, 0, 0.0])
    rows = []
    for r, n, d, f in cases:
        s = np.stack(scores[r, n, d, f])
        patch = (s - exact) / np.maximum(exact, 1e-6)
        image = (s.max(1) - exact.max(1)) / np.maximum(exact.max(1), 1e-6)
        rows.append({"select": r if n else "-", "images": n or "all",
                     "search": f"{d} axes, rerank {base.rerank}" if d else "exact", "refine": f,
                     "patch_excess_mean_%": round(float(100 * patch.mean()), 2),
                     "patch_excess_p99_%": round(float(100 * np.quantile(patch, 0.99)), 1),
                     "patches_exact_%": round(float(100 * (patch <= 1e-6).mean()), 1),
                     "image_excess_mean_%": round(float(100 * image.mean()), 2),
                     "image_excess_max_%": round(float(100 * image.max()), 1),
                     "top_5%_patches_excess_%": round(float(100 * patch[exact >= np.quantile(
                         exact, 0.95, axis=1, keepdims=True)].mean()), 2),
                     "ms_per_image": round(1000 * seconds[r, n, d, f] / len(sample), 1)})
        progress_row(rows[-1])
    report(f"routed_neighbours_{a.work.name}", rows, work=str(a.work), run=a.run, images=len(sample))


if __name__ == "__main__":
    main()

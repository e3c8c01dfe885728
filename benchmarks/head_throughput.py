"""Benchmark: scoring throughput of trained heads, the head alone (maps excluded).

For each run, scores every test image's cached features with the run's head
(``score_maps``: search or forward pass only; no upsampling, blur, metrics or
pictures), batch by batch, and reports images per second and the ratio to the
first run. Torch and faiss use the machine's default thread counts.

Usage: python benchmarks/head_throughput.py WORK RUN [RUN...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import report  # noqa: E402
from cache.store import FeatureStore  # noqa: E402
from stages.evaluate.stage import iter_classes  # noqa: E402
from stages.heads import load_trained_head  # noqa: E402


def main() -> None:
    work, runs = Path(sys.argv[1]), sys.argv[2:]
    store = FeatureStore(work / "cache" / "test.zarr")
    batches = [np.stack([it["features"] for it in items]).astype(np.float32) for _, items in iter_classes(store)]
    n_images = sum(len(b) for b in batches)
    rows = []
    for run in runs:
        head, meta = load_trained_head(work / "runs" / run / "checkpoints" / "final.pt", torch.device("cpu"))
        head.score_maps(torch.from_numpy(batches[0][:1]))  # warm-up
        t0 = time.perf_counter()
        for b in batches:
            for s in range(0, len(b), 16):
                head.score_maps(torch.from_numpy(b[s:s + 16]))
        dt = time.perf_counter() - t0
        rows.append({"run": run, "head": meta["head"], "images": n_images, "seconds": dt,
                     "img_per_s": n_images / dt, "ms_per_img": 1000 * dt / n_images})
    for r in rows:
        r["speed_vs_first"] = r["img_per_s"] / rows[0]["img_per_s"]
    report(f"throughput-{work.name}", rows, work=str(work))


if __name__ == "__main__":
    main()

"""Benchmark: the greedy coreset in blocks against one selection over every row.

One greedy selection reads every row once per pick, so its time grows with
N^2 at a fixed fraction (``stages.search.greedy_coreset``). Above
``CORESET_BLOCK_ROWS`` the rows are cut into blocks reduced one by one. This
measures, on one real class's normal training rows (the cache's features;
no test image is read), the time of a 10 % coreset in one selection and in
2, 3 and 6 blocks, and how well each covers the rows: every row's exact
distance to its nearest kept row (mean, 99th percentile, maximum), and the
same for a random 10 % sample as the floor a coreset must beat.

Usage: python benchmarks/coreset_blocks.py WORK CLASS [FRACTION]
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
from cache.stream import TrainCache  # noqa: E402
from stages.heads.knn import bank_rows  # noqa: E402
from stages.search import MemoryBank, greedy_coreset  # noqa: E402


def coverage(rows: np.ndarray, kept: np.ndarray) -> dict[str, float]:
    """Each row's exact distance to its nearest kept row: mean, p99, max."""
    bank = MemoryBank(rows[kept])
    d = np.concatenate([bank.score(torch.from_numpy(rows[lo:lo + 8192])).numpy()
                        for lo in range(0, len(rows), 8192)])
    return {"mean_dist": float(d.mean()), "p99_dist": float(np.percentile(d, 99)), "max_dist": float(d.max())}


def main() -> None:
    work, name = Path(sys.argv[1]), sys.argv[2]
    fraction = float(sys.argv[3]) if len(sys.argv) > 3 else 0.1
    cache = TrainCache(FeatureStore(work / "cache" / "train.zarr"))
    k = cache.class_names.index(name)
    rows, _ = bank_rows(cache, cache.image_class == k)
    n = max(1, int(round(fraction * len(rows))))
    print(f"{name}: {len(rows)} rows x {rows.shape[1]}, keeping {n}", flush=True)
    out = []
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(rows), n, replace=False))
    out.append({"selection": "random sample", "blocks": 0, "block_rows": 0, "seconds": 0.0, **coverage(rows, sample)})
    print(out[-1], flush=True)
    for blocks in (1, 2, 3, 6):
        block_rows = -(-len(rows) // blocks)
        t0 = time.perf_counter()
        kept = greedy_coreset(rows, n, seed=0, block_rows=block_rows)
        secs = time.perf_counter() - t0
        out.append({"selection": "greedy", "blocks": blocks, "block_rows": block_rows, "seconds": round(secs, 1),
                    **coverage(rows, kept)})
        print(out[-1], flush=True)
    report(f"coreset_blocks-{name}", out, class_rows=len(rows), kept=n, channels=int(rows.shape[1]))


if __name__ == "__main__":
    main()

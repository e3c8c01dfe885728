"""Held-out synthetic-anomaly probe: how runs rank on training data alone.

The accuracy study may only choose settings on held-out training normals and
synthetic anomalies. This probe scores, for each finished run of one
workspace, the held-out normal rows against four sets of synthetic rows of the
same held-out images, from easy to faint:

- ``las``: the cached LAS rows (texture blended into the image, eq. 3);
- ``fused``: eq. 4's feature-level fusion with the stored beta;
- ``faint30`` / ``faint15``: only 30 % / 15 % of the LAS row, the rest the
  same-place normal row.

and prints the row-level AUROC of each (a JSON copy goes to bench-results/).
Comparing its ranking of the runs with their test metrics tells whether the
held-out synthetic data can stand in for real defects when choosing settings.

Usage: python benchmarks/heldout_probe.py WORK RUN [RUN ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import progress_row, report  # noqa: E402
from cache.store import FeatureStore  # noqa: E402
from cache.stream import TrainCache  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from stages.heads import load_trained_head  # noqa: E402
from stages.metrics import auroc  # noqa: E402
from stages.train.labels import holdout_images  # noqa: E402


def held_out_sets(cache: TrainCache, held: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Held-out normal rows and the four synthetic row sets built from their LAS rows."""
    normal, las, pair, beta = [], [], [], []
    for s in range(cache.n_shards):
        if not held[cache.image_offsets[s]:cache.image_offsets[s + 1]].any():
            continue
        d = cache.load(s)
        keep = held[d["image"]]
        a = keep & (d["anomaly"] == 1)
        normal.append(d["features"][keep & (d["anomaly"] == 0)])
        las.append(d["features"][a])
        pair.append(d["features"][d["pair"][a]])
        beta.append(d["beta"][a])
    n, x, p, b = (torch.from_numpy(np.concatenate(v).astype(np.float32)) for v in (normal, las, pair, beta))
    b = b[:, None]
    return n, {"las": x, "fused": (1 - b) * x + b * p, "faint30": 0.3 * x + 0.7 * p, "faint15": 0.15 * x + 0.85 * p}


def main(work: Path, runs: list[str]) -> None:
    cfg = load_config(work / "runs" / runs[0] / "config.toml")
    cache = TrainCache(FeatureStore(work / "cache" / "train.zarr"))
    held = holdout_images(cache, cfg.train.holdout, cfg.train.seed)
    normal, sets = held_out_sets(cache, held)
    device = torch.device("cpu")
    rows = []
    for run in runs:
        head, _ = load_trained_head(work / "runs" / run / "checkpoints" / "final.pt", device)
        s_normal = head.score_maps(torch.as_tensor(normal)[None].float())[0].numpy()
        row: dict[str, object] = {"run": run}
        for name, x in sets.items():
            s = head.score_maps(torch.as_tensor(x)[None].float())[0].numpy()
            y = np.r_[np.zeros(len(s_normal)), np.ones(len(s))]
            row[name] = round(auroc(y, np.r_[s_normal, s]), 4)
        rows.append(row)
        progress_row(row)
    print(f"\n{work.name}: {int(held.sum())} held-out images, {len(normal)} normal rows, "
          f"{len(sets['las'])} synthetic rows per set")
    report(f"heldout_probe_{work.name}", rows, work=str(work), held_out_images=int(held.sum()))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2:])

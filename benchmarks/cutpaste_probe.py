"""Held-out structural-anomaly probe: rank runs without test labels.

The accuracy study may only choose settings on held-out training data. The
training synthesis (LAS textures, GAS) cannot judge the discriminator that
learned it (see ``heldout_probe.py``), so this probe makes anomalies of a kind
no run trains on: CutPaste and CutPaste-Scar (a piece of the same image moved
onto its foreground; ``stages.extract.synthesis.cut_paste``) on the held-out training
images of each run's workspace. The held-out images themselves are the normal
images. Each run is scored exactly as ``clad evaluate`` scores the test set
(maps, image score = max, image AUROC, pixel AUROC, AUPRO@0.3), per class and
on average; a JSON copy goes to bench-results/ and a picture of the first
synthetic images next to it.

Usage: python benchmarks/cutpaste_probe.py WORK RUN [RUN ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import OUT_DIR, progress_row, report  # noqa: E402
from cache.store import FeatureStore  # noqa: E402
from cache.stream import TrainCache  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from stages.heads import load_trained_head  # noqa: E402
from stages.maps import anomaly_maps, image_scores  # noqa: E402
from stages.metrics import class_metrics  # noqa: E402
from stages.train.labels import holdout_images  # noqa: E402
from stages.train.probe import build_probe  # noqa: E402

VARIANTS = 4  # CutPaste and CutPaste-Scar images per held-out image, each
KEYS = ("image_auroc", "pixel_auroc", "aupro")


def probe_set(cfg: Config, cache: TrainCache) -> dict[str, dict[str, np.ndarray]]:
    """Per class: held-out normal images and their CutPaste/Scar versions, encoded
    (``stages.train.probe.build_probe`` with ``VARIANTS`` versions of each kind)."""
    held = holdout_images(cache, cfg.train.holdout, cfg.train.seed)
    p = build_probe(cfg, cache, held, torch.device("cpu"), VARIANTS)
    return {k: {"features": p.features[k].astype(np.float32), "masks": p.masks[k], "images": p.examples[k]}
            for k in p.features}


def draw(sets: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, d = next(iter(sets.items()))
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    for ax, img, title in zip(axes, d["images"], ("held-out normal", "CutPaste", "CutPaste-Scar"), strict=True):
        ax.imshow(img)
        ax.set_title(f"{name}: {title}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(work: Path, runs: list[str]) -> None:
    cfg = load_config(work / "runs" / runs[0] / "config.toml")
    cache = TrainCache(FeatureStore(work / "cache" / "train.zarr"))
    t0 = time.perf_counter()
    sets = probe_set(cfg, cache)
    n_img = sum(len(d["masks"]) for d in sets.values())
    print(f"{work.name}: {n_img} probe images ({len(sets)} classes) encoded in {time.perf_counter() - t0:.1f} s")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    draw(sets, OUT_DIR / f"cutpaste_probe_{work.name}.png")
    size = cfg.features.output_size
    device = torch.device("cpu")
    rows, classes = [], {}
    for run in runs:
        head, _ = load_trained_head(work / "runs" / run / "checkpoints" / "final.pt", device)
        per_class, by_class = [], {}
        for name, d in sets.items():
            x = torch.from_numpy(d["features"])
            s = head.score_maps(torch.as_tensor(x).float())
            maps = anomaly_maps(s, size, cfg.evaluate.sigma)
            labels = (d["masks"].reshape(len(x), -1).max(1) > 0).astype(int)
            per_class.append(class_metrics(labels, image_scores(maps), maps, d["masks"], cfg.evaluate.aupro_fpr))
            by_class[name] = {k: round(100 * per_class[-1][k], 1) for k in KEYS}
        mean = {k: round(100 * float(np.mean([m[k] for m in per_class])), 1) for k in KEYS}
        rows.append({"run": run, **mean})
        classes[run] = by_class
        progress_row(rows[-1])
    report(f"cutpaste_probe_{work.name}", rows, work=str(work), probe_images=n_img, per_class=classes)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2:])

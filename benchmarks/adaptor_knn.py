"""Diagnostic: is CLAD's representation or its discriminator what loses to knn?

For one trained CLAD run, scores the test set three ways on the same cache:
the run's discriminator score s (what ``clad evaluate`` reports), the
nearest-neighbour distance in the run's adaptor space z (bank = the adaptor
outputs of the normal training rows, held-out images excluded), and the
nearest-neighbour distance in the raw feature space (the knn head). Nothing is
chosen from these numbers; they say where the gap to the knn head sits.

Usage: python benchmarks/adaptor_knn.py WORK RUN
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import progress_row, report  # noqa: E402
from cache.store import FeatureStore  # noqa: E402
from cache.stream import TrainCache  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from stages.evaluate.stage import iter_classes  # noqa: E402
from stages.heads import load_trained_head  # noqa: E402
from stages.heads.rows import score_in_chunks  # noqa: E402
from stages.maps import anomaly_maps, image_scores  # noqa: E402
from stages.metrics import class_metrics  # noqa: E402
from stages.search import MemoryBank  # noqa: E402
from stages.train.labels import holdout_images  # noqa: E402


class AdaptorKnn:
    """Nearest-neighbour distance after the run's adaptor."""

    def __init__(self, head: torch.nn.Module, bank: np.ndarray):
        self.adaptor = head.adaptor.eval()
        self.knn = MemoryBank(self._embed(torch.from_numpy(bank)).numpy())

    @torch.no_grad()
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.adaptor(x[s:s + 65536].float()) for s in range(0, len(x), 65536)])

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.knn.score(self._embed(x))


def main(work: Path, run: str) -> None:
    cfg = load_config(work / "runs" / run / "config.toml")
    device = torch.device("cpu")
    head, _ = load_trained_head(work / "runs" / run / "checkpoints" / "final.pt", device)
    head = head.model  # the CLAD model: adaptor + discriminator
    cache = TrainCache(FeatureStore(work / "cache" / "train.zarr"))
    bank = cache.normal_rows(holdout_images(cache, cfg.train.holdout, cfg.train.seed))
    scorers = {"discriminator s": head, "knn in adaptor space z": AdaptorKnn(head, bank),
               "knn in feature space": MemoryBank(bank)}
    size = cfg.features.output_size
    rows = []
    for name, items in iter_classes(FeatureStore(work / "cache" / "test.zarr")):
        x = torch.from_numpy(np.stack([it["features"] for it in items]).astype(np.float32))
        masks = np.stack([it["mask"] for it in items])
        labels = np.array([it["label"] for it in items])
        for label, scorer in scorers.items():
            t0 = time.perf_counter()
            s = score_in_chunks(scorer.score, x.reshape(-1, x.shape[-1]), device).reshape(len(items), -1)
            maps = anomaly_maps(s, size, cfg.evaluate.sigma)
            m = class_metrics(labels, image_scores(maps), maps, masks, cfg.evaluate.aupro_fpr)
            rows.append({"class": name, "scorer": label, "image_auroc": round(100 * m["image_auroc"], 1),
                         "pixel_auroc": round(100 * m["pixel_auroc"], 1), "aupro": round(100 * m["aupro"], 1),
                         "seconds": round(time.perf_counter() - t0, 1)})
            progress_row(rows[-1])
    report(f"adaptor_knn_{work.name}_{run}", rows, work=str(work), run=run)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2])

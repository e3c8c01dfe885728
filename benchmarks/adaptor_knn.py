"""Diagnostic: is CLAD's representation or its discriminator what loses to knn?

For one trained CLAD run, scores the test set three ways on the same cache:
the run's discriminator score s (what ``clad evaluate`` reports), the
nearest-neighbour distance in the run's adaptor space z (bank = the adaptor
outputs of the normal training rows, held-out images excluded), and the
nearest-neighbour distance in the raw feature space (the knn head). Nothing is
chosen from these numbers; they say where the gap to the knn head sits.

With ``--probe`` it scores the run's held-out probe instead (held-out normal
training images and their CutPaste/Scar versions, ``stages.train.probe``):
training-side evidence, the kind a change of scorer may be chosen on; there
a fourth scorer adds s and z, each standardised on the probe's normal patches.

Usage: python benchmarks/adaptor_knn.py WORK RUN [--probe]
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
from stages.heads.clad_bank import embed  # noqa: E402
from stages.heads.rows import score_in_chunks  # noqa: E402
from stages.maps import anomaly_maps, image_scores  # noqa: E402
from stages.metrics import class_metrics  # noqa: E402
from stages.search import MemoryBank  # noqa: E402
from stages.train.labels import holdout_images  # noqa: E402
from stages.train.probe import load_or_build_probe  # noqa: E402


class AdaptorKnn:
    """Nearest-neighbour distance after the run's adaptor."""

    def __init__(self, head: torch.nn.Module, bank: np.ndarray):
        self.model = head
        self.knn = MemoryBank(embed(head, bank, torch.device("cpu")))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.knn.score(torch.from_numpy(embed(self.model, x, torch.device("cpu"))))


def _standardised(s: torch.Tensor, normal: np.ndarray) -> torch.Tensor:
    """Patch scores ``[n, H*W]`` in units of the normal images' patch scores (mean 0, std 1)."""
    ref = s[torch.from_numpy(normal)]
    return (s - ref.mean()) / ref.std()


def test_items(work: Path):
    """Per class of the test set: features [n, H*W, C], masks, image labels."""
    for name, items in iter_classes(FeatureStore(work / "cache" / "test.zarr")):
        yield (name, np.stack([it["features"] for it in items]), np.stack([it["mask"] for it in items]),
               np.array([it["label"] for it in items]))


def head_metrics(head, cfg, feats: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> tuple[dict, float]:
    """One test class scored by a loaded head as ``clad evaluate`` scores it: (``class_metrics``,
    seconds of ``score_maps`` per image)."""
    t0 = time.perf_counter()
    s = head.score_maps(torch.from_numpy(feats.astype(np.float32)))
    per_image = (time.perf_counter() - t0) / len(feats)
    maps = anomaly_maps(s, cfg.features.output_size, cfg.evaluate.sigma)
    return class_metrics(labels, image_scores(maps), maps, masks, cfg.evaluate.aupro_fpr), per_image


def probe_items(cfg, cache: TrainCache, held: np.ndarray):
    """Per class of the held-out probe: features, masks, image labels (synthetic = 1)."""
    probe = load_or_build_probe(cfg, cache, held, cache.store.info().key, torch.device("cpu"), print)
    if probe is None:
        sys.exit("adaptor_knn: this run has no held-out images, so no probe")
    for name, x in probe.features.items():
        m = probe.masks[name]
        yield name, x, m, (m.reshape(len(m), -1).max(1) > 0).astype(int)


def main(work: Path, run: str, on_probe: bool = False) -> None:
    cfg = load_config(work / "runs" / run / "config.toml")
    device = torch.device("cpu")
    head, _ = load_trained_head(work / "runs" / run / "checkpoints" / "final.pt", device)
    head = head.model  # the CLAD model: adaptor + discriminator
    cache = TrainCache(FeatureStore(work / "cache" / "train.zarr"))
    held = holdout_images(cache, cfg.train.holdout, cfg.train.seed)
    bank = cache.normal_rows(held)
    scorers = {"discriminator s": head, "knn in adaptor space z": AdaptorKnn(head, bank),
               "knn in feature space": MemoryBank(bank)}
    size = cfg.features.output_size
    rows = []
    for name, feats, masks, labels in (probe_items(cfg, cache, held) if on_probe else test_items(work)):
        x = torch.from_numpy(feats.astype(np.float32))
        patch = {}
        for label, scorer in [*scorers.items(), ("blend of s and z", None)]:
            t0 = time.perf_counter()
            if scorer is None:  # the probe only: each score in units of its held-out normal patches
                if not on_probe:
                    continue
                s = sum(_standardised(patch[k], labels == 0) for k in ("discriminator s", "knn in adaptor space z"))
            else:
                s = score_in_chunks(scorer.score, x.reshape(-1, x.shape[-1]), device).reshape(len(feats), -1)
                patch[label] = s
            maps = anomaly_maps(s, size, cfg.evaluate.sigma)
            m = class_metrics(labels, image_scores(maps), maps, masks, cfg.evaluate.aupro_fpr)
            rows.append({"class": name, "scorer": label, "image_auroc": round(100 * m["image_auroc"], 1),
                         "pixel_auroc": round(100 * m["pixel_auroc"], 1), "aupro": round(100 * m["aupro"], 1),
                         "seconds": round(time.perf_counter() - t0, 1)})
            progress_row(rows[-1])
    for label in dict.fromkeys(r["scorer"] for r in rows):
        own = [r for r in rows if r["scorer"] == label]
        rows.append({"class": "mean", "scorer": label, **{k: round(float(np.mean([r[k] for r in own])), 1)
                                                         for k in ("image_auroc", "pixel_auroc", "aupro")},
                     "seconds": round(sum(r["seconds"] for r in own), 1)})
    report(f"adaptor_knn_{work.name}_{run}{'_probe' if on_probe else ''}", rows, work=str(work), run=run,
           on="held-out probe" if on_probe else "test set")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--probe"]
    if len(args) != 2:
        sys.exit(__doc__)
    main(Path(args[0]), args[1], on_probe="--probe" in sys.argv[1:])

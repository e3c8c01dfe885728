"""The routed knn head: nearest-neighbour search among an image's nearest training images.

The knn head searches every normal training patch for every test patch; its
cost grows with every image and class added to the bank. This head searches
far fewer rows, in two steps that both follow the data:

* **Routing.** The image's descriptor (mean patch feature, as in
  ``stages.routing``) picks its class: the class of the nearest training
  image. Patches are then never matched against another product, so a
  defect cannot find a "normal" match in a different class.
* **Neighbour images** (SPADE's idea, Cohen and Hoshen 2020). Within that
  class, only the ``images`` training images nearest to the scored image (by
  descriptor) form its bank, searched exactly (faiss L2). ``images = 0``
  searches the whole class bank (routing alone).

Search is exact within the chosen rows, so scores are deterministic and equal
to the knn head's whenever the true nearest patch lies in those images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.errors import CladError
from core.files import seeded
from stages.heads.base import Head, TrainContext
from stages.heads.knn import MemoryBank
from stages.heads.registry import register_head
from stages.labels import normal_maps
from stages.routing import pairwise


@dataclass(frozen=True)
class RoutedKnnSettings:
    """Settings of the routed knn head (the same in every profile)."""

    images: int = 16  # nearest training images searched per scored image; 0 = the whole class
    route: bool = True  # search the image's own class only
    knn_k: int = 1

    def __post_init__(self) -> None:
        if self.images < 0 or self.knn_k < 1:
            raise CladError(f"train.images={self.images}, knn_k={self.knn_k}: need images >= 0 (0 = all) and "
                            "knn_k >= 1; fix config.toml or --set")


@register_head
class RoutedKnnHead(Head):
    """Exact nearest-neighbour search among the scored image's nearest training images of its class."""

    name = "routed_knn"
    settings_class = RoutedKnnSettings
    summary = "knn among the nearest training images of the image's own class (the recommended head)"
    reads = ("holdout", "seed")

    def __init__(self, rows: np.ndarray, offsets: np.ndarray, desc: np.ndarray, desc_class: np.ndarray,
                 settings: RoutedKnnSettings, meta: dict[str, Any], image_ids: np.ndarray | None = None):
        self.rows = np.ascontiguousarray(rows, dtype=np.float32)  # [M, C]: every training image's normal rows
        self.offsets = offsets.astype(np.int64)  # [n + 1]: rows of training image j = rows[off[j]:off[j+1]]
        self.desc, self.desc_class = desc.astype(np.float32), desc_class.astype(np.int64)  # [n, C], [n]
        self.settings, self.meta, self.image_ids = settings, meta, image_ids

    @classmethod
    def fit(cls, settings: RoutedKnnSettings, ctx: TrainContext) -> tuple[RoutedKnnHead, dict[str, Any]]:
        maps = normal_maps(ctx.cache, ~ctx.held)
        ids = np.array(sorted(maps), np.int64)
        rows = np.concatenate([maps[i] for i in ids], dtype=np.float32)
        offsets = np.cumsum([0] + [len(maps[i]) for i in ids])
        desc = np.stack([maps[i].astype(np.float32).mean(0) for i in ids])
        meta = {"head": cls.name, "embed_dim": ctx.cache.embed_dim, "class_names": ctx.cache.class_names,
                "cache_key": ctx.cache_key, "train_key": ctx.run_key, "bank_rows": len(rows),
                "settings": {"images": settings.images, "route": settings.route, "knn_k": settings.knn_k}}
        head = cls(rows, offsets, desc, ctx.cache.image_class[ids], settings, meta, ids)
        return head, {"history": [], "bank_rows": len(rows), "bank_images": len(ids)}

    def checkpoint(self) -> dict[str, Any]:
        out = {"rows": torch.from_numpy(self.rows), "offsets": torch.from_numpy(self.offsets),
               "descriptors": torch.from_numpy(self.desc), "descriptor_class": torch.from_numpy(self.desc_class),
               "meta": self.meta}
        if self.image_ids is not None:
            out["image_ids"] = torch.from_numpy(self.image_ids)
        return out

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], device: torch.device) -> RoutedKnnHead:
        meta = ckpt["meta"]
        ids = ckpt.get("image_ids")
        return cls(ckpt["rows"].numpy(), ckpt["offsets"].numpy(), ckpt["descriptors"].numpy(),
                   ckpt["descriptor_class"].numpy(), RoutedKnnSettings(**meta["settings"]), meta,
                   ids.numpy() if ids is not None else None)

    # -- scoring ------------------------------------------------------------------------
    def neighbour_images(self, desc: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """Indices of the bank images searched for one scored image: among
        ``allowed`` (bool per bank image), its class's (routing) nearest ``images``."""
        d = pairwise(desc[None], self.desc)[0]
        d[~allowed] = np.inf
        if self.settings.route:
            own = self.desc_class[int(np.argmin(d))]
            d[self.desc_class != own] = np.inf
        order = np.argsort(d, kind="stable")
        order = order[np.isfinite(d[order])]
        return order[:self.settings.images] if self.settings.images else order

    def _score_one(self, x: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """``[H*W, C]`` -> ``[H*W]`` distances to the nearest rows of the chosen bank images."""
        chosen = np.sort(self.neighbour_images(x.mean(0), allowed))
        bank = np.concatenate([self.rows[self.offsets[j]:self.offsets[j + 1]] for j in chosen])
        return MemoryBank(bank, self.settings.knn_k).score(torch.from_numpy(x)).numpy()

    def score_maps(self, maps: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(maps.float().cpu().numpy())
        everything = np.ones(len(self.desc), bool)
        return torch.from_numpy(np.stack([self._score_one(m, everything) for m in x]).astype(np.float32))

    def calibration_scores(self, ctx: TrainContext, folds: int = 5) -> tuple[dict[int, np.ndarray], set[int]]:
        """Cross-fitting: each training image is scored exactly as a new image
        would be, with the images of its own fold (``folds`` seeded folds per
        class) removed from the candidates; held-out images with every
        training image. Every image counts as unseen."""
        if self.image_ids is None or folds < 2:
            return super().calibration_scores(ctx, folds)
        fold = np.full(len(ctx.held), -1)
        for c in np.unique(ctx.cache.image_class):
            idx = np.nonzero((ctx.cache.image_class == c) & ~ctx.held)[0]
            fold[seeded(ctx.seed, "calibration-folds", int(c)).permutation(idx)] = np.arange(len(idx)) % folds
        bank_fold = fold[self.image_ids]
        out: dict[int, np.ndarray] = {}
        maps = normal_maps(ctx.cache, np.ones(len(ctx.held), bool))
        for n, (i, m) in enumerate(sorted(maps.items())):
            allowed = bank_fold != fold[i] if fold[i] >= 0 else np.ones(len(self.desc), bool)
            out[i] = self._score_one(m.astype(np.float32), allowed)
            if (n + 1) % 200 == 0:
                ctx.log(f"calibrate: cross-fitted {n + 1}/{len(maps)} images")
        return out, set(out)

"""The routed knn head: nearest-neighbour search among an image's nearest training images.

The knn head searches every normal training patch for every test patch; its
cost grows with every image and class added to the bank. This head searches
far fewer rows, in two steps that both follow the data:

* **Routing.** The image's descriptor (mean patch feature, as in
  ``stages.routing``) picks its class: the class of the nearest training
  image. Patches are then never matched against another product, so a
  defect cannot find a "normal" match in a different class.
* **Neighbour images** (SPADE's idea, Cohen and Hoshen 2020). Within that
  class, only the ``images`` training images nearest to the scored image form
  its bank, searched exactly (faiss L2). ``images = 0`` searches the whole
  class bank (routing alone). "Nearest" is ``select``: ``cells`` (default)
  compares local appearance, each of the image's 4 x 4 cells (mean features of
  a 1/16 of the grid) matched to the most similar cell of the candidate, in
  any position, so a rotated or shifted part still finds the images holding
  its patches; ``mean`` compares whole-image mean features (the rule before
  2026-12-01). On bottle's training images (leave-one-out) ``cells`` leaves
  5.5 % mean patch-score excess over exact search at 16 images where ``mean``
  leaves 8.1 % (docs/RESULTS.md).

Search is exact within the chosen rows, so scores are deterministic and equal
to the knn head's whenever the true nearest patch lies in those images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cache.image_stream import cache_grid
from core.errors import CladError
from core.files import seeded
from stages.heads.base import Head, TrainContext
from stages.heads.knn import MemoryBank
from stages.heads.registry import register_head
from stages.labels import normal_maps
from stages.routing import pairwise

CELLS = 4  # cells per side of the local-appearance descriptor (4 x 4 = 16 cells per image)


def cell_descriptors(x: np.ndarray, grid: tuple[int, int], cells: int = CELLS) -> np.ndarray:
    """``[H*W, C]`` map in y * W + x order -> ``[cells * cells, C]`` float32:
    the mean feature of each cell of a ``cells`` x ``cells`` partition of the
    grid (adaptive average pooling: cells differ by at most one patch in size)."""
    h, w = grid
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).T.reshape(1, -1, h, w)
    return torch.nn.functional.adaptive_avg_pool2d(t, cells)[0].flatten(1).T.contiguous().numpy()


def cell_distance(query: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """``[k, C]`` query cells, ``[n, k', C]`` cells of n images -> ``[n]``: the
    mean over query cells of the distance to the image's most similar cell
    (position-free: a cell may match any cell of the other image)."""
    n, kb, c = bank.shape
    q, b = torch.from_numpy(query.astype(np.float32)), torch.from_numpy(bank.reshape(n * kb, c).astype(np.float32))
    d2 = (q * q).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * q @ b.T  # [k, n * k']
    return d2.clamp_min_(0).sqrt_().reshape(len(q), n, kb).amin(2).mean(0).double().numpy()


@dataclass(frozen=True)
class RoutedKnnSettings:
    """Settings of the routed knn head (the same in every profile)."""

    images: int = 16  # nearest training images searched per scored image; 0 = the whole class
    route: bool = True  # search the image's own class only
    knn_k: int = 1
    select: str = "cells"  # how "nearest" images are found: cells (local appearance) | mean (mean feature)

    def __post_init__(self) -> None:
        if self.images < 0 or self.knn_k < 1:
            raise CladError(f"train.images={self.images}, knn_k={self.knn_k}: need images >= 0 (0 = all) and "
                            "knn_k >= 1; fix config.toml or --set")
        if self.select not in ("cells", "mean"):
            raise CladError(f"train.select={self.select!r}: choose 'cells' or 'mean'; fix config.toml or --set")


@register_head
class RoutedKnnHead(Head):
    """Exact nearest-neighbour search among the scored image's nearest training images of its class."""

    name = "routed_knn"
    settings_class = RoutedKnnSettings
    summary = "knn among the nearest training images of the image's own class (the recommended head)"
    reads = ("holdout", "seed")
    added = {"select": "mean"}  # runs trained before cells existed selected by mean feature

    def __init__(self, rows: np.ndarray, offsets: np.ndarray, desc: np.ndarray, desc_class: np.ndarray,
                 settings: RoutedKnnSettings, meta: dict[str, Any], image_ids: np.ndarray | None = None,
                 cells: np.ndarray | None = None):
        self.rows = np.ascontiguousarray(rows, dtype=np.float32)  # [M, C]: every training image's normal rows
        self.offsets = offsets.astype(np.int64)  # [n + 1]: rows of training image j = rows[off[j]:off[j+1]]
        self.desc, self.desc_class = desc.astype(np.float32), desc_class.astype(np.int64)  # [n, C], [n]
        self.cells = cells  # [n, CELLS^2, C] float32 cell descriptors (select = cells), else None
        self.settings, self.meta, self.image_ids = settings, meta, image_ids
        if settings.select == "cells" and cells is None:
            raise CladError("routed_knn: select = cells but the checkpoint has no cell descriptors; "
                            "re-train with 'clad train WORK --restart'")

    @classmethod
    def fit(cls, settings: RoutedKnnSettings, ctx: TrainContext) -> tuple[RoutedKnnHead, dict[str, Any]]:
        maps = normal_maps(ctx.cache, ~ctx.held)
        ids = np.array(sorted(maps), np.int64)
        rows = np.concatenate([maps[i] for i in ids], dtype=np.float32)
        offsets = np.cumsum([0] + [len(maps[i]) for i in ids])
        desc = np.stack([maps[i].astype(np.float32).mean(0) for i in ids])
        grid = cache_grid(ctx.cache)
        cells = np.stack([cell_descriptors(maps[i], grid) for i in ids]) if settings.select == "cells" else None
        meta = {"head": cls.name, "embed_dim": ctx.cache.embed_dim, "class_names": ctx.cache.class_names,
                "cache_key": ctx.cache_key, "train_key": ctx.run_key, "bank_rows": len(rows), "grid": list(grid),
                "settings": {"images": settings.images, "route": settings.route, "knn_k": settings.knn_k,
                             "select": settings.select}}
        head = cls(rows, offsets, desc, ctx.cache.image_class[ids], settings, meta, ids, cells)
        return head, {"history": [], "bank_rows": len(rows), "bank_images": len(ids)}

    def checkpoint(self) -> dict[str, Any]:
        out = {"rows": torch.from_numpy(self.rows), "offsets": torch.from_numpy(self.offsets),
               "descriptors": torch.from_numpy(self.desc), "descriptor_class": torch.from_numpy(self.desc_class),
               "meta": self.meta}
        if self.image_ids is not None:
            out["image_ids"] = torch.from_numpy(self.image_ids)
        if self.cells is not None:
            out["cells"] = torch.from_numpy(self.cells)
        return out

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], device: torch.device) -> RoutedKnnHead:
        meta = ckpt["meta"]
        ids, cells = ckpt.get("image_ids"), ckpt.get("cells")
        settings = RoutedKnnSettings(**{**cls.added, **meta["settings"]})
        return cls(ckpt["rows"].numpy(), ckpt["offsets"].numpy(), ckpt["descriptors"].numpy(),
                   ckpt["descriptor_class"].numpy(), settings, meta,
                   ids.numpy() if ids is not None else None, cells.numpy() if cells is not None else None)

    # -- scoring ------------------------------------------------------------------------
    def neighbour_images(self, x: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """Indices of the bank images searched for one scored ``[H*W, C]`` map:
        among ``allowed`` (bool per bank image), its class's (routing, by mean
        feature) nearest ``images`` (by ``select``)."""
        d = pairwise(x.mean(0)[None], self.desc)[0]
        d[~allowed] = np.inf
        if self.settings.route:
            own = self.desc_class[int(np.argmin(d))]
            d[self.desc_class != own] = np.inf
        if self.settings.select == "cells" and self.settings.images and np.isfinite(d).sum() > self.settings.images:
            cand = np.nonzero(np.isfinite(d))[0]
            d[cand] = cell_distance(cell_descriptors(x, tuple(self.meta["grid"])), self.cells[cand])
        order = np.argsort(d, kind="stable")
        order = order[np.isfinite(d[order])]
        return order[:self.settings.images] if self.settings.images else order

    def _score_one(self, x: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """``[H*W, C]`` -> ``[H*W]`` distances to the nearest rows of the chosen bank images."""
        chosen = np.sort(self.neighbour_images(x, allowed))
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

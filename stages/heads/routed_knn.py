"""The routed knn head: nearest-neighbour search among an image's nearest training images.

The knn head searches every normal training patch for every test patch; its
cost grows with every image and class added to the bank. This head searches
far fewer rows, in steps that all follow the data (the kernels are in
``stages.search``; why each setting has its value, measured on training
data, is in docs/RESULTS.md, "The recommended head reaches the knn head"):

* **Routing.** The image's descriptor (mean patch feature) picks its class by
  the one routing rule (``stages.train.routing.class_distances``): the class
  of the nearest training image of this head's bank. Patches are then never
  matched against another product, so a defect cannot find a "normal" match
  in a different class.
* **Neighbour images** (SPADE's idea, Cohen and Hoshen 2020). Within that
  class, only the ``images`` training images nearest to the scored image form
  its bank. ``images = 0`` searches the whole class bank (routing alone).
  "Nearest" is ``select``: ``cells`` (default) compares local appearance,
  each of the image's 4 x 4 cells (mean features of a 1/16 of the grid)
  matched to the most similar cell of the candidate, in any position, so a
  rotated or shifted part still finds the images holding its patches;
  ``mean`` compares whole-image mean features (the older rule).
* **Projected candidates, exact distances.** With ``project`` = d > 0 each
  patch's nearest row in each chosen image is found in the rows' top-d
  principal axes (fitted on a seeded sample of the bank at training), which
  costs about d / C of a full search; the ``rerank`` best of these candidates
  are then measured exactly in all C channels and the nearest true distance
  is the patch's score. A score is always the true distance to a real
  training patch (never below the exact nearest-neighbour distance); the
  cost saved buys more neighbour images, which lowers the error far more
  than the projection adds. ``project = 0`` searches exactly in all channels.
* **Refinement.** The ``refine`` share of each image's highest-scoring
  patches, where false alarms and missed defects are decided, are searched
  again over every training image of the class (same candidate search), so
  the image score and the top of the map are (nearly) the class-exact ones.

Scores are deterministic and equal to the knn head's whenever the true
nearest patch lies in the searched images (and, projected, among the
candidates).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from cache.image_stream import cache_grid
from core.errors import CladError
from core.files import seeded
from core.schema import Settings, setting
from stages.heads.base import ExportContext, Head, TrainContext
from stages.heads.registry import register_head
from stages.search import (
    CELLS,
    MemoryBank,
    cell_descriptors,
    cell_distance,
    exact_distances,
    nearest_per_image,
    pairwise,
    principal_axes,
)
from stages.train.labels import calibration_folds, normal_maps
from stages.train.routing import class_distances

AXES_SAMPLE = 65536  # bank rows sampled (seeded) to fit the principal axes


@dataclass(frozen=True)
class RoutedKnnSettings(Settings):
    """Settings of the routed knn head (the same in every profile)."""

    images: int = setting(32, low=0, help="nearest training images searched per scored image; 0 = the whole class")
    route: bool = setting(True, help="search the image's own class only")
    knn_k: int = setting(1, low=1, help="> 1: mean of the k nearest, by exact search among the chosen images "
                                        "(no projection, no refine)")
    select: str = setting("cells", choices=("cells", "mean"), added="mean",
                          help='how "nearest" images are found: cells (local appearance) | mean (mean feature)')
    project: int = setting(64, low=0, added=0,
                           help="principal axes of the candidate search; 0 = exact search in all channels")
    rerank: int = setting(4, low=1, help="candidates per patch measured exactly (project > 0)")
    refine: float = setting(0.05, low=0, high=1, added=0.0,
                            help="share of each image's highest-scoring patches searched again over the whole class")


@register_head
class RoutedKnnHead(Head):
    """Nearest-neighbour search among the scored image's nearest training
    images of its class: projected candidates measured exactly, the
    highest-scoring patches refined over the whole class (module docstring)."""

    name = "routed_knn"
    settings_class = RoutedKnnSettings
    summary = "knn among the nearest training images of the image's own class (the recommended head)"
    reads = ("holdout", "seed")

    def __init__(self, rows: np.ndarray, offsets: np.ndarray, desc: np.ndarray, desc_class: np.ndarray,
                 settings: RoutedKnnSettings, meta: dict[str, Any], image_ids: np.ndarray | None = None,
                 cells: np.ndarray | None = None, axes: tuple[np.ndarray, np.ndarray] | None = None):
        self.rows = np.ascontiguousarray(rows, dtype=np.float32)  # [M, C]: every training image's normal rows
        self.offsets = offsets.astype(np.int64)  # [n + 1]: rows of training image j = rows[off[j]:off[j+1]]
        self.desc, self.desc_class = desc.astype(np.float32), desc_class.astype(np.int64)  # [n, C], [n]
        self.cells = cells  # [n, CELLS^2, C] float32 cell descriptors (select = cells), else None
        self.settings, self.meta, self.image_ids = settings, meta, image_ids
        if settings.select == "cells" and cells is None or settings.project and axes is None:
            raise CladError("routed_knn: the checkpoint lacks what its settings need (cells or axes); "
                            "re-train with 'clad train WORK --run NAME --restart'")
        self.axes = axes  # (mean [C], basis [C, d]) of the candidate search, or None
        self._rows = torch.from_numpy(self.rows)
        self._spaces: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}  # projected? -> (rows, squared norms)

    def _space(self, projected: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The search space's ``[M, d]`` rows and ``[M]`` squared norms: the
        rows in the principal axes (derived once, not stored in the
        checkpoint) or the rows themselves."""
        if projected not in self._spaces:
            z = torch.from_numpy((self.rows - self.axes[0]) @ self.axes[1]) if projected else self._rows
            self._spaces[projected] = (z, (z * z).sum(1))
        return self._spaces[projected]

    @classmethod
    def fit(cls, settings: RoutedKnnSettings, ctx: TrainContext) -> tuple[RoutedKnnHead, dict[str, Any]]:
        maps = normal_maps(ctx.cache, ~ctx.held)
        ids = np.array(sorted(maps), np.int64)
        rows = np.concatenate([maps[i] for i in ids], dtype=np.float32)
        offsets = np.cumsum([0] + [len(maps[i]) for i in ids])
        desc = np.stack([maps[i].astype(np.float32).mean(0) for i in ids])
        grid = cache_grid(ctx.cache)
        cells = np.stack([cell_descriptors(maps[i], grid) for i in ids]) if settings.select == "cells" else None
        axes = None
        if settings.project:
            sample = seeded(ctx.seed, "routed-axes").choice(len(rows), min(len(rows), AXES_SAMPLE), replace=False)
            axes = principal_axes(rows[np.sort(sample)], min(settings.project, rows.shape[1]))
        meta = {"head": cls.name, "embed_dim": ctx.cache.embed_dim, "class_names": ctx.cache.class_names,
                "cache_key": ctx.cache_key, "train_key": ctx.run_key, "bank_rows": len(rows), "grid": list(grid)}
        head = cls(rows, offsets, desc, ctx.cache.image_class[ids], settings, meta, ids, cells, axes)
        return head, {"history": [], "bank_rows": len(rows), "bank_images": len(ids)}

    def checkpoint(self) -> dict[str, Any]:
        out = {"rows": torch.from_numpy(self.rows), "offsets": torch.from_numpy(self.offsets),
               "descriptors": torch.from_numpy(self.desc), "descriptor_class": torch.from_numpy(self.desc_class),
               "meta": self.checkpoint_meta()}
        if self.image_ids is not None:
            out["image_ids"] = torch.from_numpy(self.image_ids)
        if self.cells is not None:
            out["cells"] = torch.from_numpy(self.cells)
        if self.axes is not None:
            out["axes_mean"], out["axes_basis"] = torch.from_numpy(self.axes[0]), torch.from_numpy(self.axes[1])
        return out

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], device: torch.device) -> RoutedKnnHead:
        meta = ckpt["meta"]
        ids, cells = ckpt.get("image_ids"), ckpt.get("cells")
        axes = (ckpt["axes_mean"].numpy(), ckpt["axes_basis"].numpy()) if "axes_basis" in ckpt else None
        settings = cls.settings_from_meta(meta)
        return cls(ckpt["rows"].numpy(), ckpt["offsets"].numpy(), ckpt["descriptors"].numpy(),
                   ckpt["descriptor_class"].numpy(), settings, meta,
                   ids.numpy() if ids is not None else None, cells.numpy() if cells is not None else None, axes)

    # -- deploy -------------------------------------------------------------------------
    def export(self, ctx: ExportContext) -> dict[str, Any]:
        """Rule ``routed_knn``: routing descriptors of every bank image, the principal axes, and per
        class its images' rows, row offsets and cell descriptors in separate files (a runtime
        loads a class when it scores an image of it)."""
        files: dict[str, Any] = {"descriptors": ctx.save("descriptors", self.desc),
                                 "descriptor_class": ctx.save("descriptor_class", self.desc_class), "classes": {}}
        if self.axes is not None:
            files["axes_mean"], files["axes_basis"] = ctx.save("axes_mean", self.axes[0]), ctx.save("axes_basis",
                                                                                                   self.axes[1])
        for k, name in enumerate(self.meta["class_names"]):
            members = np.nonzero(self.desc_class == k)[0]
            if not len(members):
                continue
            sizes = self.offsets[members + 1] - self.offsets[members]
            per = {"rows": ctx.save(f"rows_{name}", np.concatenate(
                       [self.rows[self.offsets[j]:self.offsets[j + 1]] for j in members])),
                   "offsets": ctx.save(f"offsets_{name}", np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))}
            if self.cells is not None:
                per["cells"] = ctx.save(f"cells_{name}", self.cells[members])
            files["classes"][name] = per
        settings = {**asdict(self.settings), "grid": list(self.meta.get("grid", [])), "cells": CELLS}
        return {"rule": "routed_knn", "settings": settings, "files": files}

    # -- scoring ------------------------------------------------------------------------
    def class_images(self, x: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """The bank images of one scored ``[H*W, C]`` map's class (routing, by
        mean feature), among ``allowed`` (bool per bank image), nearest first
        (by ``select``; by mean feature where every one is searched anyway)."""
        d = pairwise(x.mean(0)[None], self.desc)[0]
        d[~allowed] = np.inf
        if self.settings.route:  # the one routing rule (stages.train.routing), over this bank's images
            own = int(np.argmin(class_distances(d, self.desc_class, len(self.meta["class_names"]))))
            d[self.desc_class != own] = np.inf
        if self.settings.select == "cells" and self.settings.images and np.isfinite(d).sum() > self.settings.images:
            cand = np.nonzero(np.isfinite(d))[0]
            d[cand] = cell_distance(cell_descriptors(x, tuple(self.meta["grid"])), self.cells[cand])
        order = np.argsort(d, kind="stable")
        return order[np.isfinite(d[order])]

    def _nearest(self, q: torch.Tensor, images: np.ndarray) -> torch.Tensor:
        """``[q, C]`` -> ``[q]``: true distance to the nearest of each query's
        candidates among ``images`` (its nearest row per image in the search
        space; the ``rerank`` best of those in projection, the best in full)."""
        projected = bool(self.settings.project)
        zq = (q - torch.from_numpy(self.axes[0])) @ torch.from_numpy(self.axes[1]) if projected else q
        d2, idx = nearest_per_image(zq, *self._space(projected), self.offsets, images)
        r = min(self.settings.rerank if projected else 1, len(images))
        candidates = idx.gather(1, d2.topk(r, 1, largest=False).indices)  # [q, r]
        return exact_distances(q, self._rows, candidates).amin(1)

    def _score_one(self, x: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """``[H*W, C]`` -> ``[H*W]`` distances to the nearest rows of the chosen
        bank images; the ``refine`` share of highest-scoring patches searched
        again over every image of the class."""
        q = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        everyone = self.class_images(x, allowed)
        chosen = np.sort(everyone[:self.settings.images] if self.settings.images else everyone)
        if self.settings.knn_k > 1:
            bank = np.concatenate([self.rows[self.offsets[j]:self.offsets[j + 1]] for j in chosen])
            return MemoryBank(bank, self.settings.knn_k).score(q).numpy()
        s = self._nearest(q, chosen)
        top = int(round(self.settings.refine * len(q)))
        if top and len(everyone) > len(chosen):
            worst = s.topk(top).indices
            s[worst] = torch.minimum(s[worst], self._nearest(q[worst], np.sort(everyone)))
        return s.numpy()

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
        fold = calibration_folds(ctx.cache, ctx.held, ctx.seed, folds)
        bank_fold = fold[self.image_ids]
        out: dict[int, np.ndarray] = {}
        maps = normal_maps(ctx.cache, np.ones(len(ctx.held), bool))
        for n, (i, m) in enumerate(sorted(maps.items())):
            allowed = bank_fold != fold[i] if fold[i] >= 0 else np.ones(len(self.desc), bool)
            out[i] = self._score_one(m.astype(np.float32), allowed)
            if (n + 1) % 200 == 0:
                ctx.log(f"calibrate: cross-fitted {n + 1}/{len(maps)} images")
        return out, set(out)

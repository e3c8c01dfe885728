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

**Memory bounded by one class.** The run refers to the training cache it was
trained on instead of copying it: the checkpoint keeps what the head chose
(bank image indices, their row offsets, descriptors, cells, axes), and the
bank rows of one class at a time are read from the cache when an image of
that class is scored (``attach_cache``; the cache key is checked). Training,
calibration and export walk the classes one by one, so no stage holds more
than one class's rows. Checkpoints written before (with a ``rows`` copy) load
and score as they did. Describing and reading the bank: ``routed_bank``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from cache.image_stream import cache_grid
from cache.stream import TrainCache
from core.errors import CladError
from core.files import seeded
from core.schema import Settings, setting
from stages.heads.base import ExportContext, Head, TrainContext
from stages.heads.registry import register_head
from stages.heads.routed_bank import ALL, ClassBank, describe_bank, read_class_bank
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
    cross_fits = True  # calibration_scores: each image scored by a bank without it
    settings_class = RoutedKnnSettings
    summary = "knn among the nearest training images of the image's own class (the recommended head)"
    reads = ("holdout", "seed")

    def __init__(self, rows: np.ndarray | None, offsets: np.ndarray, desc: np.ndarray, desc_class: np.ndarray,
                 settings: RoutedKnnSettings, meta: dict[str, Any], image_ids: np.ndarray | None = None,
                 cells: np.ndarray | None = None, axes: tuple[np.ndarray, np.ndarray] | None = None):
        # [M, C]: every bank image's normal rows (a self-contained head), or None: read per class
        # from the training cache (attach_cache; needs image_ids)
        self.rows = None if rows is None else np.ascontiguousarray(rows, dtype=np.float32)
        self.offsets = offsets.astype(np.int64)  # [n + 1]: rows of bank image j = rows[off[j]:off[j+1]]
        self.desc, self.desc_class = desc.astype(np.float32), desc_class.astype(np.int64)  # [n, C], [n]
        self.cells = cells  # [n, CELLS^2, C] float32 cell descriptors (select = cells), else None
        self.settings, self.meta, self.image_ids = settings, meta, image_ids
        if settings.select == "cells" and cells is None or settings.project and axes is None \
                or rows is None and image_ids is None:
            raise CladError("routed_knn: the checkpoint lacks what its settings need (cells, axes or image ids); "
                            "re-train with 'clad train WORK --run NAME --restart'")
        self.axes = axes  # (mean [C], basis [C, d]) of the candidate search, or None
        self._cache: Callable[[], TrainCache] | None = None
        self._bank: ClassBank | None = None  # the one class whose rows are held

    def attach_cache(self, cache: Callable[[], TrainCache]) -> None:
        """Where the bank rows are read from (the run's training cache, checked by the caller)."""
        self._cache = cache

    def _group(self, images: np.ndarray) -> int:
        """The class of bank images ``images`` (all of one class when routed), else ALL."""
        classes = np.unique(self.desc_class[images])
        return int(classes[0]) if len(classes) == 1 else ALL

    def class_bank(self, group: int) -> ClassBank:
        """The rows of one class's bank images (ALL: every image), read once and kept until
        another class is asked for: at most one class's rows are held."""
        if self._bank is not None and self._bank.group == group:
            return self._bank
        self._bank = None  # free the last class's rows before reading the next
        self._bank = read_class_bank(group, self.desc_class, self.offsets, self.rows, self.image_ids, self._cache)
        return self._bank

    @classmethod
    def fit(cls, settings: RoutedKnnSettings, ctx: TrainContext) -> tuple[RoutedKnnHead, dict[str, Any]]:
        """Descriptors, cells and the axes' row sample, class by class (one class's maps held at a
        time); the bank rows stay in the cache. The axes' sample is the one a concatenated bank
        would give (seeded row positions over every bank row in image order)."""
        bank = ~ctx.held
        ids = np.nonzero(bank)[0].astype(np.int64)
        sizes = np.zeros(len(bank), np.int64)
        for _, img in ctx.cache.row_counts():
            sizes += np.bincount(img, minlength=len(bank))
        offsets = np.concatenate([[0], np.cumsum(sizes[ids])]).astype(np.int64)
        grid = cache_grid(ctx.cache)
        picked = np.zeros(0, np.int64)
        if settings.project:
            picked = np.sort(seeded(ctx.seed, "routed-axes").choice(
                int(offsets[-1]), min(int(offsets[-1]), AXES_SAMPLE), replace=False))
        desc, cells, sample = describe_bank(ctx.cache, ids, sizes, offsets, picked, settings.select == "cells",
                                            ctx.log)
        axes = principal_axes(sample, min(settings.project, sample.shape[1])) if settings.project else None
        meta = {"head": cls.name, "embed_dim": ctx.cache.embed_dim, "class_names": ctx.cache.class_names,
                "cache_key": ctx.cache_key, "train_key": ctx.run_key, "bank_rows": int(offsets[-1]),
                "grid": list(grid), "bank": "cache"}
        head = cls(None, offsets, desc, ctx.cache.image_class[ids], settings, meta, ids, cells, axes)
        head.attach_cache(lambda: ctx.cache)
        return head, {"history": [], "bank_rows": int(offsets[-1]), "bank_images": len(ids)}

    def checkpoint(self) -> dict[str, Any]:
        """What the head chose; the rows themselves only for a self-contained head (``rows`` given)."""
        out = {"offsets": torch.from_numpy(self.offsets), "descriptors": torch.from_numpy(self.desc),
               "descriptor_class": torch.from_numpy(self.desc_class), "meta": self.checkpoint_meta()}
        if self.rows is not None:
            out["rows"] = torch.from_numpy(self.rows)
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
        ids, cells, rows = ckpt.get("image_ids"), ckpt.get("cells"), ckpt.get("rows")
        axes = (ckpt["axes_mean"].numpy(), ckpt["axes_basis"].numpy()) if "axes_basis" in ckpt else None
        settings = cls.settings_from_meta(meta)
        return cls(rows.numpy() if rows is not None else None, ckpt["offsets"].numpy(), ckpt["descriptors"].numpy(),
                   ckpt["descriptor_class"].numpy(), settings, meta,
                   ids.numpy() if ids is not None else None, cells.numpy() if cells is not None else None, axes)

    # -- deploy -------------------------------------------------------------------------
    def export(self, ctx: ExportContext) -> dict[str, Any]:
        """Rule ``routed_knn``: routing descriptors of every bank image, the principal axes, and per
        class its images' rows, row offsets and cell descriptors in separate files (a runtime
        loads a class when it scores an image of it). Classes are read one at a time."""
        files: dict[str, Any] = {"descriptors": ctx.save("descriptors", self.desc),
                                 "descriptor_class": ctx.save("descriptor_class", self.desc_class), "classes": {}}
        if self.axes is not None:
            files["axes_mean"], files["axes_basis"] = ctx.save("axes_mean", self.axes[0]), ctx.save("axes_basis",
                                                                                                   self.axes[1])
        for k, name in enumerate(self.meta["class_names"]):
            if not (self.desc_class == k).any():
                continue
            bank = self.class_bank(k)
            per = {"rows": ctx.save(f"rows_{name}", bank.rows.numpy()), "offsets": ctx.save(f"offsets_{name}",
                                                                                           bank.offsets)}
            if self.cells is not None:
                per["cells"] = ctx.save(f"cells_{name}", self.cells[bank.members])
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

    def _nearest(self, q: torch.Tensor, bank: ClassBank, images: np.ndarray) -> torch.Tensor:
        """``[q, C]`` -> ``[q]``: true distance to the nearest of each query's
        candidates among bank images ``images`` (members of ``bank``; its
        nearest row per image in the search space; the ``rerank`` best of
        those in projection, the best in full)."""
        projected = bool(self.settings.project)
        zq = (q - torch.from_numpy(self.axes[0])) @ torch.from_numpy(self.axes[1]) if projected else q
        d2, idx = nearest_per_image(zq, *bank.space(self.axes, projected), bank.offsets, bank.local[images])
        r = min(self.settings.rerank if projected else 1, len(images))
        candidates = idx.gather(1, d2.topk(r, 1, largest=False).indices)  # [q, r]
        return exact_distances(q, bank.rows, candidates).amin(1)

    def _score_one(self, x: np.ndarray, everyone: np.ndarray) -> np.ndarray:
        """``[H*W, C]`` -> ``[H*W]`` distances to the nearest rows of the chosen
        bank images (the first ``images`` of ``everyone``, ``class_images``' order);
        the ``refine`` share of highest-scoring patches searched again over
        every image of the class."""
        q = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        chosen = np.sort(everyone[:self.settings.images] if self.settings.images else everyone)
        bank = self.class_bank(self._group(everyone))
        if self.settings.knn_k > 1:
            local = bank.local[chosen]
            rows = torch.cat([bank.rows[bank.offsets[t]:bank.offsets[t + 1]] for t in local])
            return MemoryBank(rows.numpy(), self.settings.knn_k).score(q).numpy()
        s = self._nearest(q, bank, chosen)
        top = int(round(self.settings.refine * len(q)))
        if top and len(everyone) > len(chosen):
            worst = s.topk(top).indices
            s[worst] = torch.minimum(s[worst], self._nearest(q[worst], bank, np.sort(everyone)))
        return s.numpy()

    def score_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Routes every map first, then scores them class by class (one class's rows read at a time)."""
        x = np.ascontiguousarray(maps.float().cpu().numpy())
        everything = np.ones(len(self.desc), bool)
        found = [self.class_images(m, everything) for m in x]
        out = np.zeros(x.shape[:2], np.float32)
        for n in sorted(range(len(x)), key=lambda n: self._group(found[n])):
            out[n] = self._score_one(x[n], found[n])
        return torch.from_numpy(out)

    def calibration_scores(self, ctx: TrainContext, folds: int = 5) -> tuple[dict[int, np.ndarray], set[int]]:
        """Cross-fitting: each training image is scored exactly as a new image
        would be, with the images of its own fold (``folds`` seeded folds per
        class) removed from the candidates; held-out images with every
        training image. Every image counts as unseen. Class by class: one
        class's maps and rows held at a time."""
        if self.image_ids is None or folds < 2:
            return super().calibration_scores(ctx, folds)
        fold = calibration_folds(ctx.cache, ctx.held, ctx.seed, folds)
        bank_fold = fold[self.image_ids]
        out: dict[int, np.ndarray] = {}
        total = len(ctx.held)
        for k in range(len(ctx.cache.class_names)):
            for i, m in sorted(normal_maps(ctx.cache, ctx.cache.image_class == k).items()):
                allowed = bank_fold != fold[i] if fold[i] >= 0 else np.ones(len(self.desc), bool)
                x = m.astype(np.float32)
                out[i] = self._score_one(x, self.class_images(x, allowed))
                if len(out) % 200 == 0:
                    ctx.log(f"calibrate: cross-fitted {len(out)}/{total} images")
        return out, set(out)

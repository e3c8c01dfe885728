"""The knn head: a PatchCore-style memory bank of normal training rows.

Exact L2 search (``stages.search.MemoryBank``; optionally on a greedy coreset). Because refitting
is only dropping rows, verdict calibration cross-fits: each training image is
scored against a bank without the rows of its own fold of images.

The run refers to the training cache instead of copying it: the checkpoint keeps
the image of every bank row and, with a coreset, which rows were kept; the rows
are read from the cache when the head first scores (``attach_cache``). The
search itself holds every bank row of every class, so its memory and time grow
with the whole bank: that is what this head is (``routed_knn`` holds one class).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cache.stream import TrainCache
from core.errors import CladError
from core.schema import Settings, setting
from stages.heads.base import ExportContext, Head, TrainContext
from stages.heads.registry import register_head
from stages.search import MemoryBank, greedy_coreset
from stages.train.labels import calibration_folds, normal_maps


@dataclass(frozen=True)
class KnnSettings(Settings):
    """knn's own settings (the same in every profile)."""

    knn_coreset: float = setting(1.0, above=0, high=1,
                                 help="fraction of normal rows kept by the greedy coreset; 1.0 = all")
    knn_k: int = setting(1, low=1, help="neighbours averaged per row")


def bank_rows(cache: TrainCache, bank_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normal rows of the images marked in ``bank_images`` (bool per cache image), float32
    ``[M, C]`` in storage order, and the image index of each row ``[M]``."""
    rows, images = [], []
    for s in range(cache.n_shards):
        if not bank_images[cache.image_offsets[s]:cache.image_offsets[s + 1]].any():
            continue
        d = cache.load(s, ("features", "anomaly", "image"))
        keep = (d["anomaly"] == 0) & bank_images[d["image"]]
        rows.append(d["features"][keep])
        images.append(d["image"][keep])
    return np.concatenate(rows, dtype=np.float32), np.concatenate(images)


@register_head
class KnnHead(Head):
    """Nearest-neighbour distance to a bank of normal training patches (PatchCore-style)."""

    name = "knn"
    cross_fits = True  # calibration_scores: each image scored by a bank without it
    settings_class = KnnSettings
    summary = "nearest-neighbour memory bank (PatchCore-style baseline)"
    reads = ("holdout", "seed")

    def __init__(self, bank: np.ndarray | None, settings: KnnSettings, meta: dict[str, Any],
                 bank_images: np.ndarray | None = None, kept: np.ndarray | None = None):
        # bank: [M, C] rows (a self-contained head), or None: read from the training cache
        # (attach_cache): the normal rows of the images in bank_images [M], the coreset's kept
        # positions among them [M] (None: all)
        self.settings, self.meta, self.bank_images, self.kept = settings, meta, bank_images, kept
        if bank is None and bank_images is None:
            raise CladError("knn: the checkpoint has neither bank rows nor their images; "
                            "re-train with 'clad train WORK --run NAME --restart'")
        self._bank = None if bank is None else MemoryBank(bank, settings.knn_k)
        self._cache: Callable[[], TrainCache] | None = None

    def attach_cache(self, cache: Callable[[], TrainCache]) -> None:
        self._cache = cache

    @property
    def bank(self) -> MemoryBank:
        """The memory bank, read from the cache on first use (every chosen row, float32)."""
        if self._bank is None:
            if self._cache is None:
                raise CladError("knn: this run reads its bank rows from the training cache; "
                                "load it with stages.heads.load_trained_head")
            cache = self._cache()
            marked = np.zeros(len(cache.image_ids), bool)
            marked[np.unique(self.bank_images)] = True
            rows, images = bank_rows(cache, marked)
            if self.kept is not None:
                rows, images = rows[self.kept], images[self.kept]
            if not np.array_equal(images, self.bank_images):
                raise CladError(f"{cache.store.path}: does not hold this run's bank rows; "
                                "re-train with 'clad train WORK --run NAME --restart'")
            self._bank = MemoryBank(rows, self.settings.knn_k)
        return self._bank

    @classmethod
    def fit(cls, settings: KnnSettings, ctx: TrainContext) -> tuple[KnnHead, dict[str, Any]]:
        bank, images = bank_rows(ctx.cache, ~ctx.held)
        kept = None
        if settings.knn_coreset < 1.0:
            n = max(1, int(len(bank) * settings.knn_coreset))
            ctx.log(f"train: greedy coreset {n} of {len(bank)} rows")
            chosen = greedy_coreset(bank, n, ctx.seed, device=ctx.device,
                                    progress=lambda k, total: ctx.log(f"train: coreset {k}/{total}"))
            # kept: positions among the rows of the images that keep any row (what the cache gives back)
            of_kept = np.isin(images, np.unique(images[chosen]))
            kept = (np.cumsum(of_kept) - 1)[chosen]
            bank, images = bank[chosen], images[chosen]
        meta = {"head": cls.name, "embed_dim": ctx.cache.embed_dim, "class_names": ctx.cache.class_names,
                "cache_key": ctx.cache_key, "train_key": ctx.run_key, "bank_rows": len(bank), "bank": "cache"}
        head = cls(None, settings, meta, images, kept)
        head._bank = MemoryBank(bank, settings.knn_k)  # this process has the rows already
        return head, {"history": [], "bank_rows": len(bank)}

    def checkpoint(self) -> dict[str, Any]:
        """Which rows the bank holds (their image; the coreset's positions); the rows
        themselves only for a head built from rows without their images."""
        out: dict[str, Any] = {"meta": self.checkpoint_meta()}
        if self.bank_images is None:
            out["bank"] = torch.from_numpy(self.bank.rows)
        else:
            out["bank_images"] = torch.from_numpy(self.bank_images.astype(np.int64))
        if self.kept is not None:
            out["kept"] = torch.from_numpy(self.kept.astype(np.int64))
        return out

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], device: torch.device) -> KnnHead:
        images, kept, bank = ckpt.get("bank_images"), ckpt.get("kept"), ckpt.get("bank")
        return cls(bank.numpy() if bank is not None else None, cls.settings_from_meta(ckpt["meta"]), ckpt["meta"],
                   images.numpy() if images is not None else None, kept.numpy() if kept is not None else None)

    def score_maps(self, maps: torch.Tensor) -> torch.Tensor:
        n, hw, c = maps.shape
        out = [self.bank.score(maps.reshape(-1, c)[s:s + 65536]) for s in range(0, n * hw, 65536)]
        return (torch.cat(out) if out else torch.zeros(0)).reshape(n, hw)

    def export(self, ctx: ExportContext) -> dict[str, Any]:
        """The memory bank as ``.npy`` arrays, one file per class (a run trained before bank rows
        recorded their image: one file); the runtime searches all of them (rule ``knn_bank``)."""
        rows = self.bank.rows
        if self.bank_images is None:
            files = {"all": ctx.save("bank_all", rows)}
        else:
            cls = ctx.image_class[self.bank_images]
            files = {name: ctx.save(f"bank_{name}", rows[cls == k]) for k, name in enumerate(ctx.class_names)
                     if (cls == k).any()}
        return {"rule": "knn_bank", "settings": {"k": int(self.bank.k), "distance": "euclidean, exact"},
                "files": {"bank": files}}

    def calibration_scores(self, ctx: TrainContext, folds: int = 5) -> tuple[dict[int, np.ndarray], set[int]]:
        """Cross-fitting (``cross_fitted_scores``); every image counts as unseen."""
        if self.bank_images is None or folds < 2:  # a run trained before bank rows recorded their image
            return super().calibration_scores(ctx, folds)
        out = cross_fitted_scores(ctx, self.bank.rows, self.bank_images, self.bank.k, folds, self.bank.score)
        return out, set(out)


def cross_fitted_scores(ctx: TrainContext, rows: np.ndarray, row_images: np.ndarray, k: int, folds: int,
                        held_score: Callable[[torch.Tensor], torch.Tensor]) -> dict[int, np.ndarray]:
    """Patch scores of every normal training image by a bank that never saw it.

    Held-out images are scored by ``held_score`` (the deployed bank); the
    other images of each class are split into ``folds`` seeded folds, and each
    fold is scored by exact search over the bank without the rows of that fold's
    images. A fold bank is a little smaller than the real one, so these
    scores err high: thresholds from them err towards fewer false alarms.
    """
    out = {i: held_score(torch.from_numpy(m.astype(np.float32))).numpy()
           for i, m in normal_maps(ctx.cache, ctx.held).items()}
    fold = calibration_folds(ctx.cache, ctx.held, ctx.seed, folds)
    for f in range(folds):
        members = fold == f
        if not members.any():
            continue
        ctx.log(f"calibrate: cross-fitting fold {f + 1}/{folds} ({int(members.sum())} images)")
        sub = MemoryBank(rows[~members[row_images]], k)
        for i, m in normal_maps(ctx.cache, members).items():
            out[i] = sub.score(torch.from_numpy(m.astype(np.float32))).numpy()
    return out

"""Memory-bank scoring rules in numpy: ``knn_bank`` (every class's rows, exact L2) and
``routed_knn`` (the nearest training images of the image's own class; the
training side's ``stages.heads.routed_knn``, step by step)."""

from __future__ import annotations

from typing import Any

import numpy as np


def pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[n, m]`` Euclidean distances (float64 for stable small values)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0))


def exact_distances(x: np.ndarray, rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``[q, C]`` queries, ``[q, r]`` row indices -> ``[q, r]`` distances computed directly."""
    diff = rows[idx] - x[:, None, :]
    return np.sqrt(np.einsum("qrc,qrc->qr", diff, diff))


def k_nearest(x: np.ndarray, rows: np.ndarray, sq: np.ndarray, k: int, block: int = 8192,
              queries: int = 1024) -> np.ndarray:
    """``[q, k]`` exact distances to the k nearest rows, ascending (candidates by the expansion)."""
    k = min(k, len(rows))
    out = []
    for s in range(0, len(x), queries):
        xq = x[s:s + queries]
        best_d = np.full((len(xq), 0), np.inf, np.float32)
        best_i = np.zeros((len(xq), 0), np.int64)
        for b in range(0, len(rows), block):
            d2 = sq[None, b:b + block] - 2 * xq @ rows[b:b + block].T
            kk = min(k, d2.shape[1])
            i = np.argpartition(d2, kk - 1, axis=1)[:, :kk] if kk < d2.shape[1] else \
                np.broadcast_to(np.arange(d2.shape[1]), d2.shape).copy()
            best_d = np.concatenate([best_d, np.take_along_axis(d2, i, 1)], 1)
            best_i = np.concatenate([best_i, i + b], 1)
            if best_d.shape[1] > k:
                keep = np.argpartition(best_d, k - 1, axis=1)[:, :k]
                best_d, best_i = np.take_along_axis(best_d, keep, 1), np.take_along_axis(best_i, keep, 1)
        out.append(np.sort(exact_distances(xq, rows, best_i), 1))
    return np.concatenate(out)


class KnnBank:
    """Rule ``knn_bank``: mean distance to the ``k`` nearest rows of every class's bank."""

    def __init__(self, bundle: Any, spec: dict[str, Any]):
        files = spec["files"]["bank"]
        self.rows = np.ascontiguousarray(np.concatenate([bundle.array(files[c]) for c in files]), np.float32)
        self.sq = (self.rows * self.rows).sum(1)
        self.k = int(spec["settings"]["k"])

    def score_maps(self, maps: np.ndarray, class_hint: list[str] | None = None) -> np.ndarray:
        n, hw, c = maps.shape
        return k_nearest(maps.reshape(-1, c), self.rows, self.sq, self.k).mean(1).reshape(n, hw).astype(np.float32)


def cell_descriptors(x: np.ndarray, grid: tuple[int, int], cells: int) -> np.ndarray:
    """``[H*W, C]`` -> ``[cells^2, C]``: mean feature of each cell (adaptive average pooling bins)."""
    h, w = grid
    m = x.reshape(h, w, -1)
    out = []
    for i in range(cells):
        y0, y1 = (i * h) // cells, -((-(i + 1) * h) // cells)
        for j in range(cells):
            x0, x1 = (j * w) // cells, -((-(j + 1) * w) // cells)
            out.append(m[y0:y1, x0:x1].reshape(-1, m.shape[-1]).mean(0))
    return np.stack(out).astype(np.float32)


def cell_distance(query: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """``[k, C]`` query cells, ``[n, k', C]`` cells of n images -> ``[n]``: mean over query cells of the
    distance to the image's most similar cell."""
    n, kb, c = bank.shape
    d = pairwise(query, bank.reshape(n * kb, c))
    return d.reshape(len(query), n, kb).min(2).mean(0)


class RoutedKnn:
    """Rule ``routed_knn``; loads a class's rows only when an image of that class is scored."""

    def __init__(self, bundle: Any, spec: dict[str, Any]):
        self.bundle, self.spec, self.s = bundle, spec, spec["settings"]
        f = spec["files"]
        self.desc = bundle.array(f["descriptors"]).astype(np.float32)
        self.desc_class = bundle.array(f["descriptor_class"]).astype(np.int64)
        self.classes = list(spec["classes"])
        self.local = np.zeros(len(self.desc), np.int64)  # an image's index inside its class's files
        for c in range(len(self.classes)):
            self.local[self.desc_class == c] = np.arange(int((self.desc_class == c).sum()))
        self.axes = (bundle.array(f["axes_mean"]), bundle.array(f["axes_basis"])) if "axes_basis" in f else None
        self._class: dict[int, dict[str, np.ndarray]] = {}
        self._spaces: dict[tuple[int, ...], dict[str, Any]] = {}

    def _load(self, c: int) -> dict[str, np.ndarray]:
        if c not in self._class:
            name = self.classes[c]
            per = self.spec["files"]["classes"][name]
            self._class[c] = {k: self.bundle.array(v) for k, v in per.items()}
        return self._class[c]

    def _space(self, classes: tuple[int, ...]) -> dict[str, Any]:
        """Rows of ``classes`` concatenated, each image's global row range, and the search space."""
        if classes not in self._spaces:
            rows, start = [], np.zeros(len(self.desc) + 1, np.int64)
            begin = np.zeros(len(self.desc), np.int64)
            end = np.zeros(len(self.desc), np.int64)
            base = 0
            for c in classes:
                d = self._load(c)
                members = np.nonzero(self.desc_class == c)[0]
                begin[members] = base + d["offsets"][:-1]
                end[members] = base + d["offsets"][1:]
                rows.append(d["rows"].astype(np.float32))
                base += len(d["rows"])
            r = np.ascontiguousarray(np.concatenate(rows), np.float32)
            z = ((r - self.axes[0]) @ self.axes[1]).astype(np.float32) if self.s["project"] else r
            self._spaces[classes] = {"rows": r, "z": z, "sq": (z * z).sum(1), "begin": begin, "end": end}
            del start
        return self._spaces[classes]

    def _cells(self, images: np.ndarray) -> np.ndarray:
        return np.stack([self._load(int(self.desc_class[j]))["cells"][self.local[j]] for j in images])

    def class_images(self, x: np.ndarray) -> np.ndarray:
        d = pairwise(x.mean(0)[None], self.desc)[0]
        if self.s["route"]:
            own = self.desc_class[int(np.argmin(d))]
            d[self.desc_class != own] = np.inf
        if self.s["select"] == "cells" and self.s["images"] and np.isfinite(d).sum() > self.s["images"]:
            cand = np.nonzero(np.isfinite(d))[0]
            d[cand] = cell_distance(cell_descriptors(x, tuple(self.s["grid"]), int(self.s["cells"])),
                                    self._cells(cand))
        order = np.argsort(d, kind="stable")
        return order[np.isfinite(d[order])]

    def _nearest(self, q: np.ndarray, images: np.ndarray, sp: dict[str, Any]) -> np.ndarray:
        projected = bool(self.s["project"])
        zq = ((q - self.axes[0]) @ self.axes[1]).astype(np.float32) if projected else q
        d2 = np.empty((len(q), len(images)), np.float32)
        idx = np.empty((len(q), len(images)), np.int64)
        for t, j in enumerate(images):
            a, b = int(sp["begin"][j]), int(sp["end"][j])
            v = sp["sq"][None, a:b] - 2 * zq @ sp["z"][a:b].T
            i = v.argmin(1)
            d2[:, t], idx[:, t] = v[np.arange(len(q)), i], i + a
        r = min(int(self.s["rerank"]) if projected else 1, len(images))
        pick = np.argsort(d2, 1, kind="stable")[:, :r]
        return exact_distances(q, sp["rows"], np.take_along_axis(idx, pick, 1)).min(1)

    def _score_one(self, x: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(x, dtype=np.float32)
        everyone = self.class_images(x)
        sp = self._space(tuple(sorted({int(c) for c in self.desc_class[everyone]})))
        chosen = np.sort(everyone[:self.s["images"]] if self.s["images"] else everyone)
        if self.s["knn_k"] > 1:
            bank = np.concatenate([sp["rows"][sp["begin"][j]:sp["end"][j]] for j in chosen])
            return k_nearest(q, bank, (bank * bank).sum(1), int(self.s["knn_k"])).mean(1)
        s = self._nearest(q, chosen, sp)
        top = int(round(float(self.s["refine"]) * len(q)))
        if top and len(everyone) > len(chosen):
            worst = np.argsort(-s, kind="stable")[:top]
            s[worst] = np.minimum(s[worst], self._nearest(q[worst], np.sort(everyone), sp))
        return s

    def score_maps(self, maps: np.ndarray, class_hint: list[str] | None = None) -> np.ndarray:
        return np.stack([self._score_one(m) for m in maps.astype(np.float32)]).astype(np.float32)

"""Labels and held-out images of the training cache.

Held-out images (a seeded fraction of each class) are never trained on: they
select models and calibrate verdicts. Labels are the class folders or, where
those are missing or untrusted, paper 002's pseudo-classes (k-means on
image-level features).
"""

from __future__ import annotations

import numpy as np

from cache.stream import TrainCache
from core.errors import CladError
from core.files import seeded


def holdout_images(cache: TrainCache, fraction: float, seed: int) -> np.ndarray:
    """Bool per image: held out of training (validation and threshold), per class."""
    out = np.zeros(len(cache.image_ids), bool)
    if fraction <= 0:
        return out
    for c in range(len(cache.class_names)):
        idx = np.nonzero(cache.image_class == c)[0]
        if len(idx) < 3:
            continue
        n = max(1, int(round(fraction * len(idx))))
        out[seeded(seed, "holdout", c).choice(idx, n, replace=False)] = True
    return out


def image_means(cache: TrainCache) -> np.ndarray:
    """``[n_images, C]`` float32: mean normal feature of each image (one pass, bounded)."""
    out = np.zeros((len(cache.image_ids), cache.embed_dim), np.float32)
    for s in range(cache.n_shards):
        d = cache.load(s, ("features", "anomaly", "image"))
        normal = d["anomaly"] == 0
        imgs = d["image"][normal]
        feats = d["features"][normal].astype(np.float32)
        for i in np.unique(imgs):
            out[i] = feats[imgs == i].mean(0)
    return out


def pseudo_labels(cache: TrainCache, k: int, seed: int) -> np.ndarray:
    """Paper 002: k-means (faiss) on image-level features -> a label per image."""
    import faiss

    x = image_means(cache)
    k = max(1, min(k, len(x)))
    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed % (2**31), verbose=False)
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels[:, 0].astype(np.int64)


def image_labels(labels: str, cache: TrainCache, pseudo_k: int, seed: int) -> tuple[np.ndarray, int]:
    """Label per image and the number of normal labels N (anomaly label = N).

    ``labels`` is ``classes`` (the class folders) or ``pseudo`` (paper 002's
    k-means clusters, ``pseudo_k`` of them; 0 = 2 x the number of classes).
    """
    if labels == "pseudo":
        k = pseudo_k or 2 * len(cache.class_names)
        return pseudo_labels(cache, k, seed), k
    if labels != "classes":
        raise CladError(f"data.labels={labels!r}: choose classes or pseudo")
    return cache.image_class.astype(np.int64), len(cache.class_names)


def calibration_folds(cache: TrainCache, held: np.ndarray, seed: int, folds: int) -> np.ndarray:
    """``[n_images]`` fold of each training image for cross-fitted calibration: each
    class's not-held-out images dealt into ``folds`` seeded folds; -1 for held-out ones."""
    fold = np.full(len(held), -1)
    for c in np.unique(cache.image_class):
        idx = np.nonzero((cache.image_class == c) & ~held)[0]
        fold[seeded(seed, "calibration-folds", int(c)).permutation(idx)] = np.arange(len(idx)) % folds
    return fold


def held_out_rows(cache: TrainCache, held: np.ndarray, limit: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Held-out normal rows, their synthetic rows (each capped), and per-image normal maps."""
    normals, anomalies, per_image = [], [], {}
    for s in range(cache.n_shards):
        if not held[cache.image_offsets[s]:cache.image_offsets[s + 1]].any():
            continue  # no held-out image in this shard: do not read it
        d = cache.load(s, ("features", "anomaly", "image"))
        keep = held[d["image"]]
        normal = keep & (d["anomaly"] == 0)
        normals.append(d["features"][normal])
        anomalies.append(d["features"][keep & (d["anomaly"] == 1)])
        for i in np.unique(d["image"][normal]):
            per_image[int(i)] = d["features"][normal & (d["image"] == i)]
    rng = seeded(seed, "val")

    def cap(parts: list[np.ndarray]) -> np.ndarray:
        x = np.concatenate(parts) if parts else np.zeros((0, cache.embed_dim), np.float16)
        return x[np.sort(rng.choice(len(x), limit, replace=False))] if len(x) > limit else x

    return cap(normals), cap(anomalies), per_image


def normal_maps(cache: TrainCache, selected: np.ndarray) -> dict[int, np.ndarray]:
    """``{image index: [H*W, C] float16}``: the whole normal feature map of each
    selected image (its normal rows are stored in y * W + x order)."""
    out: dict[int, np.ndarray] = {}
    for s in range(cache.n_shards):
        if not selected[cache.image_offsets[s]:cache.image_offsets[s + 1]].any():
            continue  # no selected image in this shard: do not read it
        d = cache.load(s, ("features", "anomaly", "image"))
        normal = (d["anomaly"] == 0) & selected[d["image"]]
        for i in np.unique(d["image"][normal]):
            out[int(i)] = d["features"][normal & (d["image"] == i)]
    return out

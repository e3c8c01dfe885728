"""Whole normal feature maps per image, streamed from ``train.zarr`` (for map-level heads: RLR, CCL).

``BatchStream`` cuts the cache into rows; reconstruction heads need each
training image's full ``[H, W, C]`` map instead. A map is reassembled from
the image's normal rows (``anomaly == 0``) by their ``yx`` grid position, so
the storage order of rows does not matter.

An epoch visits every non-excluded image exactly once. Shards are read in a
permutation drawn from (seed, epoch), ``window`` shards at a time; the images
of a window (plus the few carried over from the previous window) are ordered
by a generator drawn from (seed, epoch, window) and cut into batches of
``batch_images``. Only the last batch of an epoch may be smaller: it is
kept (not dropped), so ``batches_per_epoch = ceil(n_images / batch_images)``.
The order is a pure function of (seed, epoch): a resumed run sees the same
batches. Peak memory is one window of shards plus the prefetched batches.

``balanced=True`` (class-aware batches for CCL): within each pool (a window's
images plus the carry) images of one label are grouped in *pairs*, and the
pairs of all labels are interleaved by stratified positions: pair ``j`` of a
label with ``n`` pairs sits at ``(j + u) / n`` with one random ``u`` in [0, 1)
per label and pool, and the pool is read in that order. What this guarantees:

- each label's pairs are spread evenly over the pool, so a batch holds each
  label in proportion to its share of the pool (within one pair), and two
  labels of equal count alternate pair by pair (a batch of 4 then holds 2 + 2);
- every image of a label with >= 2 images in the pool has a same-label
  partner next to it; only a label with an odd count leaves one single image
  per pool (CCL's positives for it then come from its feature view);
- a batch holds a single label only when the pool itself is (nearly) one
  label, e.g. a window covering one class only; use a ``window`` spanning
  several classes (shards follow the data set's plan, which is class-sorted)
  to avoid that.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cache.stream import TrainCache, interleaved_order, prefetched
from core.errors import CladError
from core.files import seeded


@dataclass
class ImageBatch:
    """One batch of whole feature maps (tensors on the target device)."""

    maps: torch.Tensor  # [B, H, W, C] float32
    image: torch.Tensor  # [B] long, global image index
    label: torch.Tensor  # [B] long, class (or pseudo-class) per image


def cache_grid(cache: TrainCache) -> tuple[int, int]:
    """(H, W) of the patch grid, read from the first shard's ``yx`` (cheap: no features)."""
    d = cache.load(0, ("yx", "anomaly"))
    yx = d["yx"][d["anomaly"] == 0].astype(np.int64)
    return int(yx[:, 0].max()) + 1, int(yx[:, 1].max()) + 1


def _assemble(d: dict[str, np.ndarray], grid: tuple[int, int], images: np.ndarray | None = None
              ) -> dict[int, np.ndarray]:
    """Per image of a loaded shard (or only ``images``): its ``[H, W, C]`` float16 normal map."""
    h, w = grid
    normal = d["anomaly"] == 0
    img = d["image"][normal]
    feats = d["features"][normal]
    yx = d["yx"][normal].astype(np.int64)
    out = {}
    for i in np.unique(img) if images is None else images:
        rows = np.nonzero(img == i)[0]
        if len(rows) != h * w:
            raise CladError(f"image {int(i)} has {len(rows)} normal rows in the cache, expected {h * w} "
                            f"(a {h}x{w} grid); re-run 'clad extract WORK --rebuild'")
        m = np.zeros((h, w, feats.shape[1]), feats.dtype)
        filled = np.zeros((h, w), bool)
        y, x = yx[rows, 0], yx[rows, 1]
        m[y, x] = feats[rows]
        filled[y, x] = True
        if not filled.all():
            raise CladError(f"image {int(i)}: its normal rows do not cover the {h}x{w} grid (duplicate yx); "
                            "re-run 'clad extract WORK --rebuild'")
        out[int(i)] = m
    return out


def image_maps(cache: TrainCache, images: Sequence[int]) -> np.ndarray:
    """``[n, H, W, C]`` float32: the normal maps of ``images`` (global indices), in that order.

    For validation sets (held-out images); reads only the shards that hold them.
    """
    images = [int(i) for i in images]
    grid = cache_grid(cache)
    shard_of = np.searchsorted(cache.image_offsets, images, side="right") - 1
    found: dict[int, np.ndarray] = {}
    for s in np.unique(shard_of):
        d = cache.load(int(s), ("features", "anomaly", "image", "yx"))
        wanted = np.array([i for i, si in zip(images, shard_of, strict=True) if si == s])
        found.update(_assemble(d, grid, wanted))
    out = np.empty((len(images), *grid, cache.embed_dim), np.float32)
    for k, i in enumerate(images):
        out[k] = found[i]
    return out


def balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``labels`` in class-interleaved order (see the module docstring).

    Each label's members are shuffled and grouped in pairs (the last may be a
    single); pair ``j`` of a label with ``n`` pairs gets the position
    ``(j + u) / n``, ``u`` ~ U[0, 1) once per label; pairs are read by position.
    """
    pos, groups = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.nonzero(labels == c)[0])
        pairs = [members[j:j + 2] for j in range(0, len(members), 2)]
        u = rng.random()
        pos.extend((j + u) / len(pairs) for j in range(len(pairs)))
        groups.extend(pairs)
    order = np.argsort(np.array(pos), kind="stable")
    return np.concatenate([groups[j] for j in order]) if groups else np.zeros(0, np.int64)


class ImageStream:
    """Reproducible batches of whole normal feature maps, ``batch_images`` images each."""

    def __init__(self, cache: TrainCache, batch_images: int, seed: int, excluded_images: np.ndarray,
                 image_labels: np.ndarray | None = None, balanced: bool = False,
                 device: torch.device | None = None, prefetch: int = 2, window: int = 4,
                 mix_classes: bool = False):
        if batch_images < 1:
            raise CladError(f"batch_images={batch_images}: must be >= 1")
        self.cache = cache
        self.batch_images = batch_images
        self.seed = seed
        self.excluded = np.asarray(excluded_images, bool)
        self.labels = np.asarray(cache.image_class if image_labels is None else image_labels, np.int64)
        if len(self.labels) != len(cache.image_ids) or len(self.excluded) != len(cache.image_ids):
            raise CladError(f"image_labels / excluded_images must have one entry per train image "
                            f"({len(cache.image_ids)})")
        self.balanced = balanced
        self.device = device or torch.device("cpu")
        self.prefetch = max(1, prefetch)
        self.window = max(1, window)
        self.mix_classes = mix_classes  # windows spread over the classes (cache.stream.interleaved_order)
        self.n_images = int((~self.excluded).sum())
        if self.n_images == 0:
            raise CladError("every train image is excluded: nothing to stream")
        self.batches_per_epoch = math.ceil(self.n_images / batch_images)
        self._grid = cache_grid(cache)

    @property
    def grid(self) -> tuple[int, int]:
        """(H, W) of the maps."""
        return self._grid

    # -- producer ---------------------------------------------------------------
    def _pools(self, epoch: int) -> Iterator[tuple[dict[int, np.ndarray], int]]:
        rng = seeded(self.seed, "image-shards", epoch)
        if self.mix_classes:
            order = interleaved_order(self.cache.image_class[self.cache.image_offsets[:-1]], rng)
        else:
            order = rng.permutation(self.cache.n_shards)
        for w in range(0, len(order), self.window):
            maps: dict[int, np.ndarray] = {}
            for shard in order[w:w + self.window]:
                lo, hi = self.cache.image_offsets[shard], self.cache.image_offsets[shard + 1]
                keep = np.nonzero(~self.excluded[lo:hi])[0] + lo
                if len(keep):
                    d = self.cache.load(int(shard), ("features", "anomaly", "image", "yx"))
                    maps.update(_assemble(d, self._grid, keep))
            yield maps, w

    def _arrange(self, ids: np.ndarray, epoch: int, w: int) -> np.ndarray:
        rng = seeded(self.seed, "images", epoch, w)
        if self.balanced:
            return ids[balanced_order(self.labels[ids], rng)]
        return ids[rng.permutation(len(ids))]

    def _produce(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        carry: dict[int, np.ndarray] = {}
        for maps, w in self._pools(epoch):
            pool = {**carry, **maps}
            ids = self._arrange(np.array(sorted(pool), np.int64), epoch, w)
            n_full = len(ids) // self.batch_images * self.batch_images
            for s in range(0, n_full, self.batch_images):
                b = ids[s:s + self.batch_images]
                yield np.stack([pool[int(i)] for i in b]), b
            carry = {int(i): pool[int(i)] for i in ids[n_full:]}
        if carry:  # the epoch's last, partial batch is kept: every image once per epoch
            ids = self._arrange(np.array(sorted(carry), np.int64), epoch, -1)
            yield np.stack([carry[int(i)] for i in ids]), ids

    def _to_batch(self, maps: np.ndarray, ids: np.ndarray) -> ImageBatch:
        def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            x = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
            return x

        return ImageBatch(t(maps, torch.float32), t(ids, torch.long), t(self.labels[ids], torch.long))

    def epoch(self, epoch: int) -> Iterator[ImageBatch]:
        """The batches of one epoch, assembled ``prefetch`` batches ahead in a thread."""
        return prefetched(lambda: (self._to_batch(m, i) for m, i in self._produce(epoch)), self.prefetch)

"""Batches of patch rows streamed from ``train.zarr``: bounded memory, reproducible.

An epoch is one pass over the (non-held-out) normal rows. Its shard order is
a permutation drawn from (seed, epoch); shards are read ``window`` at a time,
rows are shuffled within the window, and batches of exactly ``n_normal``
normal rows are cut (a remainder carries over to the next window; the last
one of an epoch is dropped). Each batch also takes ``n_anomaly`` synthetic
rows of the current window, with the feature of their same-place normal
patch for eq. 4's fusion. Reading happens in a background thread (prefetch),
so decompression overlaps with training. Peak memory is the window plus a
batch, whatever the cache size.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from cache.store import FeatureStore
from core.files import seeded

T = TypeVar("T")


@dataclass
class Batch:
    """One training batch (float32 tensors on the target device)."""

    normal: torch.Tensor  # [Bn, C]
    normal_image: torch.Tensor  # [Bn] long, global image index
    anomaly: torch.Tensor  # [Ba, C] synthesized rows
    anomaly_pair: torch.Tensor  # [Ba, C] same-place normal rows
    anomaly_beta: torch.Tensor  # [Ba]
    anomaly_image: torch.Tensor  # [Ba] long, global image index of each synthesized row


class TrainCache:
    """Read access to a train store's shards, with per-image metadata."""

    def __init__(self, store: FeatureStore):
        self.store = store
        info = store.info()
        self.class_names = info.class_names
        self.image_ids = [i for shard in info.plan for i in shard]
        self.n_shards = len(info.plan)
        self.image_offsets = np.cumsum([0] + [len(s) for s in info.plan])
        self.embed_dim = int(info.settings["features"]["embed_dim"])
        self.image_class = np.array([self.class_names.index(i.split("/")[0]) for i in self.image_ids])

    def load(self, shard: int, names: tuple[str, ...] = ("features", "anomaly", "image", "pair", "beta")
             ) -> dict[str, np.ndarray]:
        g = self.store.open_shard(shard)
        return {n: self.store.read(shard, n, group=g) for n in names}

    def normal_parts(self, excluded_images: np.ndarray, order: Iterable[int] | None = None
                     ) -> Iterator[np.ndarray]:
        """Per shard (in ``order``, default storage order): the float16 normal
        rows of the images not excluded."""
        for s in range(self.n_shards) if order is None else order:
            d = self.load(int(s), ("features", "anomaly", "image"))
            yield d["features"][(d["anomaly"] == 0) & ~excluded_images[d["image"]]]

    def normal_rows(self, excluded_images: np.ndarray) -> np.ndarray:
        """Every normal row of the images not excluded, as one float32 array
        (the knn head's memory bank: it has to fit in memory anyway). The
        float16 parts are cast while concatenating: no second full-size copy."""
        return np.concatenate(list(self.normal_parts(excluded_images)), dtype=np.float32)

    def row_sample(self, excluded_images: np.ndarray, n_normal: int, n_anomaly: int, seed: int
                   ) -> dict[str, np.ndarray]:
        """A uniform sample of about ``n_normal`` normal and ``n_anomaly`` synthetic
        rows of the images not excluded (each shard read once; the same share
        of every shard), with the synthetic rows' same-place normal rows and
        betas: ``normal`` ``[n, C]`` float16 with ``image`` ``[n]`` (global image
        index), ``anomaly``/``pair`` ``[m, C]`` float16, ``beta`` ``[m]``."""
        counts = self.row_counts()
        total_n = sum(int((~excluded_images[img]).sum()) for _, img in counts)
        total_a = sum(n - len(img) for n, img in counts)
        fn, fa = min(1.0, n_normal / max(total_n, 1)), min(1.0, n_anomaly / max(total_a, 1))
        rng = seeded(seed, "row-sample")
        out: dict[str, list[np.ndarray]] = {"normal": [], "image": [], "anomaly": [], "pair": [], "beta": []}
        for s in range(self.n_shards):
            d = self.load(s)
            keep = ~excluded_images[d["image"]]
            is_a = d["anomaly"].astype(bool)
            n_idx = np.nonzero(keep & ~is_a)[0]
            a_idx = np.nonzero(keep & is_a)[0]
            n_idx = n_idx[rng.random(len(n_idx)) < fn]
            a_idx = a_idx[rng.random(len(a_idx)) < fa]
            out["normal"].append(d["features"][n_idx])
            out["image"].append(d["image"][n_idx])
            out["anomaly"].append(d["features"][a_idx])
            out["pair"].append(d["features"][d["pair"][a_idx]])
            out["beta"].append(d["beta"][a_idx])
        return {k: np.concatenate(v) for k, v in out.items()}

    def row_counts(self) -> list[tuple[int, np.ndarray]]:
        """Per shard: (rows, per-row image index) for anomaly==0 rows; cheap (no features)."""
        out = []
        for s in range(self.n_shards):
            a = self.load(s, ("anomaly", "image"))
            out.append((len(a["anomaly"]), a["image"][a["anomaly"] == 0]))
        return out


def scaled_share(n_anomaly: int, n_normal: int, asked_normal: int) -> int:
    """Synthetic rows per batch when a small cache clips the normal rows from
    ``asked_normal`` to ``n_normal``: the same normal : synthetic ratio, at least 1."""
    if not n_anomaly or n_normal >= asked_normal:
        return n_anomaly
    return max(1, n_anomaly * n_normal // max(asked_normal, 1))


def interleaved_order(shard_class: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shard indices ordered so that every class's shards are spread evenly.

    Shards hold one class each; read in a plain permutation, a window of a
    few shards (and so every batch cut from it) often holds one or two
    classes, and batch-norm statistics and the contrastive loss's negatives
    follow whichever classes came last. Here each class's shards are shuffled
    and the j-th of a class's n shards is placed at (j + u) / n, u ~ U(0, 1):
    consecutive shards come from different classes, a class of many shards
    and one of few alike. ``shard_class`` ``[n_shards]`` int -> ``[n_shards]``.
    """
    keys = np.empty(len(shard_class))
    for c in np.unique(shard_class):
        idx = rng.permutation(np.nonzero(shard_class == c)[0])
        keys[idx] = (np.arange(len(idx)) + rng.random(len(idx))) / len(idx)
    return np.argsort(keys, kind="stable")


class BatchStream:
    """Reproducible batches of exactly ``n_normal`` + ``n_anomaly`` rows."""

    def __init__(self, cache: TrainCache, n_normal: int, n_anomaly: int, seed: int,
                 excluded_images: np.ndarray, window: int = 4, device: torch.device | None = None,
                 prefetch: int = 2, mix_classes: bool = False):
        self.cache = cache
        self.seed = seed
        self.window = max(1, window)
        self.mix_classes = mix_classes
        self.device = device or torch.device("cpu")
        self.prefetch = prefetch
        self.excluded = excluded_images  # bool per global image
        counts = cache.row_counts()
        self.total_normal = int(sum((~excluded_images[img]).sum() for _, img in counts))
        self.n_normal = min(n_normal, self.total_normal)  # a tiny cache cannot fill a huge batch
        self.n_anomaly = scaled_share(n_anomaly, self.n_normal, n_normal)
        self.batches_per_epoch = max(1, self.total_normal // max(self.n_normal, 1))

    # -- producer ---------------------------------------------------------------
    def shard_order(self, epoch: int) -> np.ndarray:
        """The epoch's shard order: a seeded permutation, or with ``mix_classes``
        each class's shards spread evenly over the epoch (``interleaved_order``)."""
        rng = seeded(self.seed, "shards", epoch)
        if not self.mix_classes:
            return rng.permutation(self.cache.n_shards)
        first = self.cache.image_offsets[:-1]
        return interleaved_order(self.cache.image_class[first], rng)

    def _windows(self, epoch: int) -> Iterator[tuple[dict[str, np.ndarray], np.random.Generator]]:
        order = self.shard_order(epoch)
        for w in range(0, len(order), self.window):
            normal, n_img, anom, a_img, pair, beta = [], [], [], [], [], []
            for shard in order[w:w + self.window]:
                d = self.cache.load(int(shard))
                keep = ~self.excluded[d["image"]]
                is_a = d["anomaly"].astype(bool)
                n_rows = keep & ~is_a
                a_rows = keep & is_a
                normal.append(d["features"][n_rows])
                n_img.append(d["image"][n_rows])
                anom.append(d["features"][a_rows])
                a_img.append(d["image"][a_rows])
                pair.append(d["features"][d["pair"][a_rows]])
                beta.append(d["beta"][a_rows])
            rng = seeded(self.seed, "rows", epoch, w)
            data = {"normal": np.concatenate(normal), "image": np.concatenate(n_img),
                    "anomaly": np.concatenate(anom), "anomaly_image": np.concatenate(a_img),
                    "pair": np.concatenate(pair), "beta": np.concatenate(beta)}
            p = rng.permutation(len(data["normal"]))
            q = rng.permutation(len(data["anomaly"]))
            data["normal"], data["image"] = data["normal"][p], data["image"][p]
            for k in ("anomaly", "anomaly_image", "pair", "beta"):
                data[k] = data[k][q]
            yield data, rng

    def _produce(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        carry_x = np.zeros((0, self.cache.embed_dim), np.float16)
        carry_i = np.zeros((0,), np.int32)
        pool: dict[str, np.ndarray] | None = None
        cursor = 0
        emitted = 0
        for data, _ in self._windows(epoch):
            if len(data["anomaly"]):
                pool, cursor = data, 0
            xs = np.concatenate([carry_x, data["normal"]])
            ims = np.concatenate([carry_i, data["image"]])
            start = 0
            while len(xs) - start >= self.n_normal and emitted < self.batches_per_epoch:
                batch = {"normal": xs[start:start + self.n_normal],
                         "image": ims[start:start + self.n_normal]}
                start += self.n_normal
                if self.n_anomaly and pool is not None:
                    idx = (cursor + np.arange(self.n_anomaly)) % len(pool["anomaly"])
                    cursor = int((cursor + self.n_anomaly) % len(pool["anomaly"]))
                    batch.update(anomaly=pool["anomaly"][idx], anomaly_image=pool["anomaly_image"][idx],
                                 pair=pool["pair"][idx], beta=pool["beta"][idx])
                yield batch
                emitted += 1
            carry_x, carry_i = xs[start:], ims[start:]

    def _to_batch(self, b: dict[str, np.ndarray]) -> Batch:
        def t(a: np.ndarray | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            if a is None:
                return torch.zeros((0, self.cache.embed_dim), dtype=dtype, device=self.device)
            x = torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
            return x

        a_img = b.get("anomaly_image", np.zeros(0, np.int64))  # a batch without synthetic rows
        return Batch(t(b["normal"]), t(b["image"], torch.long), t(b.get("anomaly")), t(b.get("pair")),
                     t(b.get("beta")).reshape(-1), t(a_img, torch.long))

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one epoch, decoded ``prefetch`` batches ahead in a thread."""
        return prefetched(lambda: (self._to_batch(b) for b in self._produce(epoch)), self.prefetch)


def prefetched(make: Callable[[], Iterator[T]], prefetch: int) -> Iterator[T]:
    """Run the generator ``make()`` in a daemon thread, ``prefetch`` items ahead
    (an exception there is re-raised here; leaving early stops the thread)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in make():
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)

    th = threading.Thread(target=work, daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while th.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(0.05)

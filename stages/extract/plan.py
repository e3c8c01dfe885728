"""The extraction plan: which images go into which shard, and the data set's fingerprint.

Images are indexed (``stages.extract.data``), sorted, and cut into shards of
``features.shard_images`` per split (train shards, then test shards). The
fingerprint (file names, sizes and mtimes) is part of the cache's settings,
so images added, removed or replaced after extraction make the cache stale.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.settings import Config
from stages.extract.data import IMAGE_SUFFIXES, Sample, index_dataset


@dataclass
class Plan:
    """Which images go into which shard, per split."""

    samples: dict[str, list[Sample]]
    shards: dict[str, list[list[int]]]  # split -> shard -> sample indices
    class_names: list[str]
    fingerprint: str
    legacy_fingerprint: str = ""  # sizes only: the fingerprint of caches extracted before mtimes were

    def units(self) -> list[tuple[str, int]]:
        return [(split, i) for split in ("train", "test") for i in range(len(self.shards[split]))]

    def image_ids(self, split: str) -> list[list[str]]:
        return [[self.samples[split][j].image_id for j in shard] for shard in self.shards[split]]

    def task(self, split: str, shard: int) -> ShardTask:
        """The part of the plan that one shard's extraction needs."""
        idx = self.shards[split][shard]
        first = sum(len(x) for x in self.shards[split][:shard])
        return ShardTask(split, shard, [self.samples[split][j] for j in idx], first, self.class_names)


@dataclass
class ShardTask:
    """One shard's images with what their rows need of the plan: the global
    index of its first image (rows' ``image``) and the class names (rows'
    ``class_id``). Shipped to a Dask worker instead of the whole plan."""

    split: str
    shard: int
    samples: list[Sample]
    first_image: int
    class_names: list[str]


def make_plan(cfg: Config) -> Plan:
    samples = index_dataset(cfg.data)
    class_names = sorted({s.class_name for s in samples})
    by_split = {sp: [s for s in samples if s.split == sp] for sp in ("train", "test")}
    n = cfg.features.shard_images
    shards = {sp: [list(range(i, min(i + n, len(v)))) for i in range(0, len(v), n)]
              for sp, v in by_split.items()}
    return Plan(by_split, shards, class_names, dataset_fingerprint(cfg, samples), _legacy_fingerprint(samples))


def _stat(path: str | Path) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def dataset_fingerprint(cfg: Config, samples: list[Sample]) -> str:
    """Hash of every input file's name, size and mtime_ns: images, masks,
    texture images and user foreground masks.

    Size and mtime (as make and rsync judge), not content: hashing the bytes
    of every image on each 'clad extract' costs a full read of the data set.
    An image replaced by another of the same size gets a new mtime and so a
    new fingerprint (unless it is copied with its old mtime kept, or written
    within the file system's timestamp granularity of the original).
    """
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.image_id}|{_stat(s.path)}|{s.mask_path and _stat(s.mask_path)}\n".encode())
    for tag, folder in (("texture", cfg.data.textures), ("fg", cfg.data.fg_masks)):
        if folder:
            root = Path(folder).expanduser()
            for p in sorted(root.rglob("*")):
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                    h.update(f"{tag}|{p.relative_to(root)}|{_stat(p)}\n".encode())
    return h.hexdigest()[:16]


def _legacy_fingerprint(samples: list[Sample]) -> str:
    """The fingerprint caches were keyed by before mtimes counted (sizes only)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.image_id}|{os.path.getsize(s.path)}|{s.mask_path and os.path.getsize(s.mask_path)}\n".encode())
    return h.hexdigest()[:16]


def dataset_changes(cfg: Config, recorded: str, cached_ids: set[str]) -> str:
    """What changed in the data set since a cache recorded the fingerprint
    ``recorded`` of the images ``cached_ids`` ("" when nothing did). As cheap
    as the fingerprint: file names, sizes and mtimes, no image is opened."""
    samples = index_dataset(cfg.data, check_masks=False)
    if recorded in (dataset_fingerprint(cfg, samples), _legacy_fingerprint(samples)):
        return ""
    now = {s.image_id for s in samples}
    added, removed = len(now - cached_ids), len(cached_ids - now)
    parts = [f"{n} image(s) {what}" for n, what in ((added, "added"), (removed, "removed")) if n]
    return " and ".join(parts or ["images, masks or texture images replaced or modified"])


def store_settings(cfg: Config, plan: Plan) -> dict[str, Any]:
    return {**cfg.extract_settings(), "dataset": plan.fingerprint}


"""The extraction plan: which images go into which shard, and the data set's fingerprint.

Images are indexed (``stages.extract.data``), sorted, and cut into shards of
``features.shard_images`` per split (train shards, then test shards). The
fingerprint (file names, sizes and mtimes) is part of the cache's settings,
so images added, removed or replaced after extraction make the cache stale;
a data set copied anew (same bytes, new mtimes) is recognised by the content
recorded at extraction (``cache/dataset.json``) and keeps its cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.files import write_atomic
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
    listed: list[Sample] = field(default_factory=list)  # every sample in index order (what fingerprints hash)

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
    return Plan(by_split, shards, class_names, dataset_fingerprint(cfg, samples), _legacy_fingerprint(samples),
                samples)


def _stat(path: str | Path) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def _content(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(cfg: Config, samples: list[Sample], describe: Callable[[str | Path], str]) -> str:
    """Hash of every input file's name and ``describe(path)``: images, masks, texture images
    and user foreground masks."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.image_id}|{describe(s.path)}|{s.mask_path and describe(s.mask_path)}\n".encode())
    for tag, folder in (("texture", cfg.data.textures), ("fg", cfg.data.fg_masks)):
        if folder:
            root = Path(folder).expanduser()
            for p in sorted(root.rglob("*")):
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                    h.update(f"{tag}|{p.relative_to(root)}|{describe(p)}\n".encode())
    return h.hexdigest()[:16]


def dataset_fingerprint(cfg: Config, samples: list[Sample]) -> str:
    """Hash of every input file's name, size and mtime_ns: images, masks,
    texture images and user foreground masks.

    Size and mtime (as make and rsync judge), not content: hashing the bytes
    of every image on each 'clad extract' costs a full read of the data set.
    An image replaced by another of the same size gets a new mtime and so a
    new fingerprint (unless it is copied with its old mtime kept, or written
    within the file system's timestamp granularity of the original). A data
    set copied anew (same bytes, new mtimes) also gets a new fingerprint; the
    cache then recognises it by its content (``dataset_content``, ``same_data``).
    """
    return _digest(cfg, samples, _stat)


def dataset_content(cfg: Config, samples: list[Sample]) -> str:
    """What ``dataset_fingerprint`` stands for, read in full: every input file's name and bytes."""
    return _digest(cfg, samples, _content)


def _record_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / "dataset.json"


def record_content(cfg: Config, cache_dir: Path, fingerprint: str, samples: list[Sample]) -> None:
    """Stage 1: remember the content of the data set whose fingerprint the cache's key holds
    (``cache/dataset.json``; one full read of the data set, once per extraction)."""
    path = _record_path(cache_dir)
    try:
        if json.loads(path.read_text()).get("fingerprint") == fingerprint:
            return
    except (OSError, ValueError):
        pass
    write_atomic(path, json.dumps({"fingerprint": fingerprint, "content": dataset_content(cfg, samples),
                                   "same_content": []}, indent=1))


def same_data(cfg: Config, cache_dir: Path, recorded: str, samples: list[Sample], now: str,
              remember: bool = False) -> bool:
    """Is the data set on disk (``samples``, fingerprint ``now``) the one the cache recorded as
    ``recorded``, though its fingerprint differs (copied anew: same bytes, new mtimes)? Decided
    by content, once per new fingerprint where ``remember`` (stage 1 writes; later stages only read)."""
    path = _record_path(cache_dir)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if rec.get("fingerprint") != recorded or not rec.get("content"):
        return False
    if now in rec.get("same_content", []):
        return True
    if dataset_content(cfg, samples) != rec["content"]:
        return False
    if remember:
        write_atomic(path, json.dumps({**rec, "same_content": [*rec.get("same_content", []), now]}, indent=1))
    return True


def _legacy_fingerprint(samples: list[Sample]) -> str:
    """The fingerprint caches were keyed by before mtimes counted (sizes only)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.image_id}|{os.path.getsize(s.path)}|{s.mask_path and os.path.getsize(s.mask_path)}\n".encode())
    return h.hexdigest()[:16]


def dataset_changes(cfg: Config, recorded: str, cached_ids: set[str], cache_dir: Path | None = None) -> str:
    """What changed in the data set since a cache recorded the fingerprint
    ``recorded`` of the images ``cached_ids`` ("" when nothing did). As cheap
    as the fingerprint (file names, sizes and mtimes, no image is opened)
    unless the fingerprint differs: then a data set with the content that
    ``cache_dir/dataset.json`` recorded is the same data set, copied."""
    samples = index_dataset(cfg.data, check_masks=False)
    now = dataset_fingerprint(cfg, samples)
    if recorded in (now, _legacy_fingerprint(samples)):
        return ""
    if cache_dir is not None and same_data(cfg, cache_dir, recorded, samples, now):
        return ""
    now = {s.image_id for s in samples}
    added, removed = len(now - cached_ids), len(cached_ids - now)
    parts = [f"{n} image(s) {what}" for n, what in ((added, "added"), (removed, "removed")) if n]
    return " and ".join(parts or ["images, masks or texture images replaced or modified"])


def store_settings(cfg: Config, plan: Plan) -> dict[str, Any]:
    return {**cfg.extract_settings(), "dataset": plan.fingerprint}


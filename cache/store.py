"""The Zarr v3 feature store: one group per split, one sub-group per shard.

Layout of ``cache/train.zarr`` (and ``test.zarr``)::

    zarr.json            attrs: settings, key, plan (shard -> image ids), class names
    shards/00003/        one zarr group per committed shard (written whole, then renamed)
    .tmp/                shards being written; discarded on restart

A shard is written under ``.tmp`` by exactly one writer, its files are
fsynced, then the folder is renamed into ``shards/``, so ``kill -9`` at any
moment loses at most the shard in flight and the finished store is
byte-identical to an uninterrupted run. A shard folder counts as committed
only if it is whole: its zarr.json, every array of the split's layout
(``LAYOUT``) and, for shards that record it (attr ``chunk_files``), every
chunk file. A folder that lost any of these (a user's ``rm``, a bad copy) is
incomplete: not counted as done, and replaced when extraction runs again. Shards are read
together as one logical table of rows (``TrainCache``), in plan order, so the
order in which Dask workers finish does not matter.

Every array ends its codec chain with crc32c: a chunk damaged on disk fails
its checksum on read, and ``read`` turns that into a ``CladError`` naming the
shard and how to re-extract it (never silently wrong features). Caches
written before the checksum still read; their damage is caught only when it
breaks decompression.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from core.errors import CladError, StaleError
from core.files import swap_into_place, temp_dir
from core.settings import diff_settings

ROW_CHUNK = 2048  # rows per chunk: ~1.5 MB at C_d = 360 float16
# What zarr/numcodecs raise on a chunk they cannot decode: crc32c mismatch
# (ValueError), a broken Blosc frame (RuntimeError / ValueError).
_DECODE_ERRORS = (ValueError, RuntimeError)


# The arrays every shard of a split holds (shapes in stages/extract.py).
LAYOUT = {
    "train": ("features", "class_id", "anomaly", "image", "yx", "pair", "beta"),
    "test": ("features", "class_id", "label", "mask"),
}


def compressors(name: str, level: int) -> list[Any] | None:
    if name == "none":
        return None
    if name not in ("lz4", "zstd"):
        raise CladError(f"features.compressor={name!r}: choose lz4, zstd or none")
    return [BloscCodec(cname=name, clevel=level, shuffle=BloscShuffle.bitshuffle)]


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _node(path: Path, node_type: str) -> dict[str, Any] | None:
    """The attributes of a Zarr v3 node's zarr.json, or None if it is missing,
    unreadable or not of ``node_type``."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != node_type:
        return None
    return meta.get("attributes") or {}


def _count_files(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


@dataclass
class StoreInfo:
    """What a store's attributes say."""

    key: str
    settings: dict[str, Any]
    plan: list[list[str]]  # shard -> image ids
    class_names: list[str]


class FeatureStore:
    """A split's store: create/validate, commit shards, open shards."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # -- creation and validation --------------------------------------------
    def exists(self) -> bool:
        return (self.path / "zarr.json").is_file()

    def info(self) -> StoreInfo:
        attrs = zarr.open_group(str(self.path), mode="r").attrs.asdict()
        return StoreInfo(attrs["key"], attrs["settings"], attrs["plan"], attrs["class_names"])

    def create_or_validate(self, key: str, settings: dict[str, Any], plan: list[list[str]],
                           class_names: list[str]) -> None:
        """Create the store, or check that an existing one has the same key.

        A store written with other settings is refused with the list of
        differing settings (never mixed with new shards).
        """
        if self.exists():
            info = self.info()
            if info.key != key:
                changes = diff_settings(info.settings, settings) or ["(data set content changed)"]
                if all(c.startswith("dataset:") for c in changes):
                    raise StaleError(f"{self.path}: the data set changed since extraction (images added, removed "
                                     "or modified; 'clad status WORK' says which); re-run "
                                     "'clad extract WORK --rebuild' to re-extract it, or restore the data set")
                raise StaleError(
                    f"{self.path}: cache was extracted with other settings ({'; '.join(changes[:5])}); "
                    "re-run 'clad extract WORK --rebuild' to discard it, or restore the old settings")
            if info.plan != plan:
                raise StaleError(f"{self.path}: the data set's images changed since extraction; "
                                 "re-run 'clad extract WORK --rebuild'")
            return
        tmp = temp_dir(self.path)
        root = zarr.open_group(str(tmp), mode="w-")
        root.attrs.update({"key": key, "settings": settings, "plan": plan, "class_names": class_names})
        (tmp / "shards").mkdir()
        swap_into_place(tmp, self.path)

    def is_empty(self) -> bool:
        """No shard was ever committed or started: the store holds its attributes only
        (an extraction that failed before its first shard), so nothing is lost by replacing it."""
        tmp = self.path / ".tmp"
        return not self._folders() and not (tmp.is_dir() and any(tmp.iterdir()))

    def discard_partial(self) -> None:
        """Drop shards whose writers died (anything under .tmp)."""
        shutil.rmtree(self.path / ".tmp", ignore_errors=True)

    def delete(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    # -- shards ----------------------------------------------------------------
    def shard_path(self, shard: int) -> Path:
        return self.path / "shards" / f"{shard:05d}"

    def problem(self, shard: int) -> str | None:
        """Why a shard folder is not a whole committed shard, or None if it is.

        Cheap (file checks and small JSON reads, no chunk data): run for every
        shard by ``clad status`` and before each extraction.
        """
        root = self.shard_path(shard)
        if not root.is_dir():
            return "missing"
        attrs = _node(root, "group")
        if attrs is None:
            return "zarr.json missing or unreadable"
        chunk_files = attrs.get("chunk_files") or {}
        for name in chunk_files or LAYOUT.get(self.path.name.removesuffix(".zarr"), ()):
            if _node(root / name, "array") is None:
                return f"array '{name}' missing or unreadable"
            if name in chunk_files and _count_files(root / name) - 1 != chunk_files[name]:
                return f"array '{name}' lost chunk files"
        return None

    def is_committed(self, shard: int) -> bool:
        return self.problem(shard) is None

    def _folders(self) -> list[int]:
        d = self.path / "shards"
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []

    def committed(self) -> list[int]:
        """Shards that are whole (see ``problem``)."""
        return [s for s in self._folders() if self.is_committed(s)]

    def incomplete(self) -> dict[int, str]:
        """Shard folders that are present but not whole: shard -> what is wrong."""
        return {s: p for s in self._folders() if (p := self.problem(s)) is not None}

    def write_shard(self, shard: int, arrays: dict[str, np.ndarray], attrs: dict[str, Any],
                    codec: list[Any] | None, chunk_rows: dict[str, int] | None = None) -> None:
        """Write all arrays of one shard, make them durable, then commit by rename."""
        final = self.shard_path(shard)
        if self.is_committed(shard):
            return
        tmp = self.path / ".tmp" / f"{shard:05d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(tmp), mode="w-", attributes=attrs)
        for name, arr in arrays.items():
            rows = (chunk_rows or {}).get(name, ROW_CHUNK)
            chunks = (max(1, min(rows, arr.shape[0])),) + arr.shape[1:]
            # crc32c last: it checksums the stored (compressed) bytes of each chunk
            a = group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                                   compressors=[*(codec if codec and arr.ndim >= 2 else []), Crc32cCodec()])
            a[...] = arr
        # zarr skips chunks that hold only the fill value: record what was written
        group.attrs["chunk_files"] = {name: _count_files(tmp / name) - 1 for name in arrays}
        _fsync_tree(tmp)
        if final.exists():  # an incomplete shard: replace it whole
            broken = self.path / ".tmp" / f"{shard:05d}-incomplete-{os.getpid()}"
            os.replace(final, broken)
            shutil.rmtree(broken, ignore_errors=True)
        os.replace(tmp, final)

    def open_shard(self, shard: int) -> zarr.Group:
        try:
            return zarr.open_group(str(self.shard_path(shard)), mode="r")
        except (OSError, *_DECODE_ERRORS) as exc:
            raise self._damaged(shard, "zarr.json", exc) from None

    def read(self, shard: int, name: str, sel: Any = Ellipsis, group: zarr.Group | None = None
             ) -> np.ndarray:
        """``group[name][sel]`` of one shard; a damaged or missing part of the
        shard raises ``CladError`` naming it and the fix."""
        g = self.open_shard(shard) if group is None else group
        try:
            return g[name][sel]
        except (KeyError, OSError, *_DECODE_ERRORS) as exc:
            raise self._damaged(shard, name, exc) from None

    def _damaged(self, shard: int, name: str, exc: BaseException) -> CladError:
        why = " ".join(str(exc).split())[:160] or type(exc).__name__
        return CladError(
            f"{self.shard_path(shard)}: '{name}' cannot be read, the cache is damaged ({why}); "
            f"delete that shard folder and re-run 'clad extract WORK' to re-extract it "
            f"(or 'clad extract WORK --rebuild' to re-extract everything)")

    def nbytes_stored(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

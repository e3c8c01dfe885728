"""Stage 1: images -> frozen backbone -> patch features in the Zarr cache.

Work is split into shards of images (train shards, then test shards). Each
shard is computed and committed on its own (``cache.store``), so extraction
resumes after a crash, runs shards in any order on a Dask cluster, and always
produces the same bytes. Train shards hold, per image, all normal patch rows
followed by the anomaly rows of its synthesized variants (only patches inside
the fused Perlin region; each with the row of its same-place normal patch).
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache.store import FeatureStore, compressors
from core.errors import CladError
from core.settings import Config
from stages.extract.data import IMAGE_SUFFIXES, Sample, index_dataset, load_image, load_mask
from stages.extract.features import FeatureEncoder
from stages.extract.synthesis import TextureSource, foreground_mask, rng_for, synthesize

EXTRACT_THREADS = 1  # intra-op threads of the backbone in every process (see run_local)


@dataclass
class Timings:
    """Seconds spent per part of extraction (for the benchmark)."""

    decode: float = 0.0
    synthesis: float = 0.0
    forward: float = 0.0
    aggregate: float = 0.0
    write: float = 0.0
    images: int = 0
    rows: int = 0

    def add(self, other: Timings) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CladError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise CladError(f"--device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)


# -- the plan ---------------------------------------------------------------
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


# -- computing one shard -------------------------------------------------------
@dataclass
class Prepared:
    """Decoded (and synthesized) images of one shard, ready for the backbone."""

    task: ShardTask
    images: np.ndarray  # [M, S, S, 3] float32: train: per sample 1 + K images
    patch_masks: list[np.ndarray] = field(default_factory=list)  # train: per synthetic image
    betas: list[float] = field(default_factory=list)
    masks: np.ndarray | None = None  # test: [n, S, S] uint8
    timings: Timings = field(default_factory=Timings)

    @property
    def split(self) -> str:
        return self.task.split

    @property
    def shard(self) -> int:
        return self.task.shard

    @property
    def samples(self) -> list[Sample]:
        return self.task.samples


class ShardExtractor:
    """Everything needed to turn a shard of images into arrays (one per process)."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.encoder = FeatureEncoder(cfg.features, device)
        self.stride = self.encoder.stride
        self.textures = TextureSource(cfg.data.textures)
        if cfg.data.textures and not self.textures.files:
            raise CladError(f"data.textures={cfg.data.textures!r}: no images found; point it at a "
                            "folder of texture images (e.g. DTD) or leave it empty for built-in textures")
        self.texture_classes = set(cfg.data.texture_classes)

    def _foreground(self, s: Sample, image: np.ndarray) -> np.ndarray:
        if self.cfg.data.fg_masks:
            p = Path(self.cfg.data.fg_masks) / s.class_name / Path(s.path).name
            if p.is_file():
                return load_mask(str(p), self.cfg.features).astype(np.float32)
        return foreground_mask(image, s.class_name in self.texture_classes)

    def prepare(self, task: ShardTask) -> Prepared:
        """Decode (and for train, synthesize); pure CPU, safe in a helper thread."""
        t = Timings()
        split = task.split
        images, pmasks, betas, masks = [], [], [], []
        for s in task.samples:
            t0 = time.perf_counter()
            img = load_image(s.path, self.cfg.features)
            if split == "test":
                masks.append(load_mask(s.mask_path, self.cfg.features))
            t.decode += time.perf_counter() - t0
            images.append(img)
            if split == "train":
                t0 = time.perf_counter()
                fg = self._foreground(s, img)
                for v in range(self.cfg.synthesis.variants):
                    syn = synthesize(img, fg, self.textures, self.cfg.synthesis, self.stride,
                                     rng_for(self.cfg.synthesis.seed, s.image_id, v))
                    images.append(syn.image)
                    pmasks.append(syn.patch_mask)
                    betas.append(syn.beta)
                t.synthesis += time.perf_counter() - t0
        t.images = len(task.samples)
        return Prepared(task, np.stack(images), pmasks, betas,
                        np.stack(masks) if masks else None, t)

    def compute(self, prep: Prepared) -> dict[str, np.ndarray]:
        return self.finish(prep, self.encoder.levels(prep.images, prep.timings))

    def finish(self, prep: Prepared, levels: list[list[torch.Tensor]]) -> dict[str, np.ndarray]:
        """Project backbone outputs to patch rows and lay out the shard's arrays."""
        feats = self.encoder.project(levels, prep.timings)
        arrays = (self._train_arrays(prep, feats) if prep.split == "train"
                  else self._test_arrays(prep, feats))
        prep.timings.rows = int(arrays["features"].shape[0] * (1 if prep.split == "train"
                                                               else arrays["features"].shape[1]))
        return arrays

    def _train_arrays(self, prep: Prepared, feats: np.ndarray) -> dict[str, np.ndarray]:
        k = self.cfg.synthesis.variants
        hw = feats.shape[1]
        side = int(round(hw ** 0.5))
        yx_all = np.stack(np.divmod(np.arange(hw), side), axis=1).astype(np.int16)
        parts: dict[str, list[np.ndarray]] = {n: [] for n in
                                              ("features", "class_id", "anomaly", "image", "yx", "pair", "beta")}
        row = 0
        for i, s in enumerate(prep.samples):
            cid = _class_id(prep.task, s)
            normal_start = row
            blocks = [(feats[i * (k + 1)], np.ones(hw, bool), -1, 1.0)]
            for v in range(k):
                pm = prep.patch_masks[i * k + v].reshape(-1)
                if pm.size != hw:  # a bug, not bad input: the labels would land on other patches
                    raise RuntimeError(f"patch mask of {prep.patch_masks[i * k + v].shape} cells for "
                                       f"{hw} feature rows ({self.cfg.features.backbone}, stride {self.stride})")
                blocks.append((feats[i * (k + 1) + 1 + v], pm, 1, prep.betas[i * k + v]))
            for rows, keep, is_anom, beta in blocks:
                idx = np.nonzero(keep)[0]
                n = len(idx)
                parts["features"].append(rows[idx])
                parts["class_id"].append(np.full(n, cid, np.int16))
                parts["anomaly"].append(np.full(n, is_anom > 0, np.uint8))
                parts["image"].append(np.full(n, prep.task.first_image + i, np.int32))
                parts["yx"].append(yx_all[idx])
                parts["pair"].append((normal_start + idx).astype(np.int32) if is_anom > 0
                                     else np.full(n, -1, np.int32))
                parts["beta"].append(np.full(n, beta, np.float16))
                row += n
        return {name: np.concatenate(v) for name, v in parts.items()}

    def _test_arrays(self, prep: Prepared, feats: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "features": feats,
            "class_id": np.array([_class_id(prep.task, s) for s in prep.samples], np.int16),
            "label": np.array([s.label for s in prep.samples], np.uint8),
            "mask": prep.masks,
        }

    def write(self, store: FeatureStore, prep: Prepared, arrays: dict[str, np.ndarray]) -> None:
        t0 = time.perf_counter()
        attrs = {"image_ids": [s.image_id for s in prep.samples],
                 "paths": [s.path for s in prep.samples],
                 "defects": [s.defect for s in prep.samples]}
        chunk_rows = {"features": 1, "mask": 1} if prep.split == "test" else None
        store.write_shard(prep.shard, arrays, attrs,
                          compressors(self.cfg.features.compressor, self.cfg.features.clevel), chunk_rows)
        prep.timings.write += time.perf_counter() - t0


def _class_id(task: ShardTask, s: Sample) -> int:
    return task.class_names.index(s.class_name)


# -- running the stage -----------------------------------------------------------
def stores(cache_dir: Path) -> dict[str, FeatureStore]:
    return {sp: FeatureStore(cache_dir / f"{sp}.zarr") for sp in ("train", "test")}


def open_stores(cfg: Config, cache_dir: Path, plan: Plan, rebuild: bool = False) -> dict[str, FeatureStore]:
    """Create the stores or validate existing ones against this configuration."""
    from core.settings import settings_hash

    out = stores(cache_dir)
    for split, store in out.items():
        if rebuild:
            store.delete()
        settings = store_settings(cfg, plan)
        if (store.exists() and plan.legacy_fingerprint
                and store.info().settings.get("dataset") == plan.legacy_fingerprint):
            # extracted before mtimes were fingerprinted: its key stays valid
            # (a same-size replacement made before this upgrade goes unseen)
            settings["dataset"] = plan.legacy_fingerprint
        if store.exists() and store.is_empty() and store.info().key != settings_hash(settings):
            store.delete()  # an extraction with other settings that stopped before its first shard: nothing to keep
        store.create_or_validate(settings_hash(settings), settings, plan.image_ids(split), plan.class_names)
        store.discard_partial()
    return out


def pending_units(plan: Plan, st: dict[str, FeatureStore]) -> list[tuple[str, int]]:
    return [(sp, i) for sp, i in plan.units() if not st[sp].is_committed(i)]


def run_local(cfg: Config, plan: Plan, st: dict[str, FeatureStore], units: list[tuple[str, int]],
              device: torch.device, on_done: Any = None) -> Timings:
    """In-process extraction; decoding/synthesis of the next shard and the
    write of the previous one overlap with the backbone forward.

    The backbone runs with ``EXTRACT_THREADS`` intra-op threads, as in every
    Dask worker: oneDNN's reductions depend on the thread count, and a fixed
    count makes the cache bit-identical however the shards were spread. The
    other core decodes, synthesizes and compresses meanwhile.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(EXTRACT_THREADS)
    try:
        return _run_local(cfg, plan, st, units, device, on_done)
    finally:
        torch.set_num_threads(threads)


def _run_local(cfg: Config, plan: Plan, st: dict[str, FeatureStore], units: list[tuple[str, int]],
               device: torch.device, on_done: Any) -> Timings:
    ex = ShardExtractor(cfg, device)
    total = Timings()
    if not units:
        return total

    def prep(u: tuple[str, int]) -> Prepared:
        return ex.prepare(plan.task(*u))

    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        pending_write: Future | None = None
        nxt: Future = reader.submit(prep, units[0])
        for k in range(len(units)):
            prepared = nxt.result()
            if k + 1 < len(units):
                nxt = reader.submit(prep, units[k + 1])
            levels = ex.encoder.levels(prepared.images, prepared.timings)
            if pending_write is not None:
                _finish(pending_write, total, on_done)
            # projection, layout, compression and the commit run on the other core
            pending_write = writer.submit(_write_and_return, ex, st[prepared.split], prepared, levels)
        if pending_write is not None:
            _finish(pending_write, total, on_done)
    return total


def _write_and_return(ex: ShardExtractor, store: FeatureStore, prep: Prepared,
                      levels: list[list[torch.Tensor]]) -> Prepared:
    ex.write(store, prep, ex.finish(prep, levels))
    return prep


def _finish(fut: Future, total: Timings, on_done: Any) -> None:
    prep = fut.result()
    total.add(prep.timings)
    if on_done:
        on_done(prep)


# Per worker process: the extractor is built once and reused for every shard
# of one extraction (settings and data set: a worker that outlives a run on
# other files builds a new one).
_WORKER_CACHE: dict[tuple[str, str], ShardExtractor] = {}


def extract_unit(cfg: Config, task: ShardTask, fingerprint: str, cache_dir: str, device: str) -> dict[str, Any]:
    """Idempotent Dask task: compute and commit one shard, return its timings.

    ``task`` carries the shard's samples, image offset and class names (not
    the whole plan); ``fingerprint`` is the plan's data set fingerprint.
    """
    split, shard = task.split, task.shard
    st = stores(Path(cache_dir))[split]
    if st.is_committed(shard):
        return {"split": split, "shard": shard, "images": 0, "skipped": True}
    key = (cfg.extract_key(), fingerprint)
    if key not in _WORKER_CACHE:
        torch.set_num_threads(EXTRACT_THREADS)
        _WORKER_CACHE.clear()
        _WORKER_CACHE[key] = ShardExtractor(cfg, resolve_device(device))
    ex = _WORKER_CACHE[key]
    prep = ex.prepare(task)
    ex.write(st, prep, ex.compute(prep))
    return {"split": split, "shard": shard, "skipped": False, **asdict(prep.timings)}


def run_dask(cfg: Config, plan: Plan, cache_dir: Path, units: list[tuple[str, int]], device: str,
             scheduler: str, on_done: Any = None) -> Timings:
    """Spread shards over a Dask cluster: a LocalCluster for 'local', else an address."""
    from dask.distributed import Client, LocalCluster, as_completed

    total = Timings()
    if scheduler == "local":
        cluster = LocalCluster(n_workers=max(1, min(2, os.cpu_count() or 1)), threads_per_worker=1,
                               processes=True, dashboard_address=None)
    else:
        cluster = None
    try:
        with Client(cluster if cluster is not None else scheduler) as client:
            futures = [client.submit(extract_unit, cfg, plan.task(sp, i), plan.fingerprint, str(cache_dir),
                                     device, key=f"extract-{cfg.extract_key()}-{plan.fingerprint}-{sp}-{i}",
                                     pure=False)
                       for sp, i in units]
            for fut in as_completed(futures):
                res = fut.result()
                if not res.get("skipped"):
                    total.add(Timings(**{k: res[k] for k in asdict(Timings())}))
                if on_done:
                    on_done(res)
    except OSError as exc:
        raise CladError(f"--scheduler {scheduler}: cannot reach the Dask scheduler ({exc}); "
                        "check the address or use --scheduler local") from None
    finally:
        if cluster is not None:
            cluster.close()
    return total


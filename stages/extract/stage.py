"""Stage 1: images -> frozen backbone -> patch features in the Zarr cache.

Work is split into shards of images (``stages.extract.plan``). Each shard is
computed and committed on its own (``stages.extract.shards``,
``cache.store``), so extraction resumes after a crash, runs shards in any
order on a Dask cluster, and always produces the same bytes. This module
opens the stores and runs the pending shards, in this process or on Dask.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cache.store import FeatureStore
from core.devices import resolve_device
from core.settings import Config
from stages.extract.plan import Plan, ShardTask, same_data, store_settings
from stages.extract.shards import Prepared, ShardExtractor, Timings

EXTRACT_THREADS = 1  # intra-op threads of the backbone in every process (see run_local)


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
        recorded = store.info().settings.get("dataset") if store.exists() else None
        if recorded and plan.legacy_fingerprint and recorded == plan.legacy_fingerprint:
            # extracted before mtimes were fingerprinted: its key stays valid
            # (a same-size replacement made before this upgrade goes unseen)
            settings["dataset"] = plan.legacy_fingerprint
        elif (recorded and recorded != plan.fingerprint
              and same_data(cfg, cache_dir, recorded, plan.listed, plan.fingerprint, remember=True)):
            settings["dataset"] = recorded  # the same files copied anew (new mtimes): the cache holds them
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
    from dask.distributed import as_completed

    from core.cluster import dask_client

    total = Timings()
    with dask_client(scheduler) as client:
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
    return total

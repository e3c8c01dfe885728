"""``clad extract``: bookkeeping around stage 1 (what is pending, progress, the timing record)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from core.devices import resolve_device
from core.files import write_atomic
from core.settings import Config
from pipeline.progress import progress, say
from pipeline.workspace import Workspace

if TYPE_CHECKING:
    import torch


def extract_run(ws: Workspace, scheduler: str, device: str, rebuild: bool) -> None:
    """``clad extract`` while holding the workspace's extraction lock: the pending
    shards, then ``cache/extract.json`` (seconds, rows, bytes and where time went)."""
    from stages.extract.plan import make_plan
    from stages.extract.stage import open_stores, pending_units, run_dask, run_local

    cfg = ws.config()
    dev = resolve_device(device)
    plan = make_plan(cfg)
    st = open_stores(cfg, ws.cache_dir, plan, rebuild)
    if st["train"].info().settings["dataset"] not in (plan.fingerprint, plan.legacy_fingerprint):
        say("extract: the data set's files have new modification times but the content the cache was "
            "extracted from (a copy): the cache and its runs are kept")
    units = pending_units(plan, st)
    n_units = len(plan.units())
    for sp, store in st.items():
        for i, why in store.incomplete().items():
            say(f"extract: {sp}.zarr shard {i:05d} is incomplete ({why}); re-extracting it")
    if not units:
        say(f"extract: already done ({n_units} shards, {sum(len(v) for v in plan.samples.values())} images)")
        _record(cfg, ws, plan, st)
        _probe(cfg, ws, dev)
        return
    n_images = sum(len(plan.shards[sp][i]) for sp, i in units)
    say(f"extract: {len(units)}/{n_units} shards to do ({n_images} images) on {dev.type}"
        + (f", Dask scheduler {scheduler}" if scheduler else ""))
    bar = progress(n_images, "extract", unit="img")

    def done(res) -> None:  # noqa: ANN001 - a Prepared or a Dask result dict
        bar.update(len(res.samples) if hasattr(res, "samples") else len(plan.shards[res["split"]][res["shard"]]))

    t0 = time.perf_counter()
    with bar:
        if scheduler:
            timings = run_dask(cfg, plan, ws.cache_dir, units, device, scheduler, done)
        else:
            timings = run_local(cfg, plan, st, units, dev, done)
    dt = time.perf_counter() - t0
    size = sum(s.nbytes_stored() for s in st.values())
    write_atomic(ws.cache_dir / "extract.json", json.dumps(
        {"seconds": dt, "images": n_images, "img_per_s": n_images / dt, "rows": timings.rows,
         "bytes": size, "device": dev.type, "scheduler": scheduler or "in-process",
         "breakdown_s": {k: getattr(timings, k) for k in ("decode", "synthesis", "forward", "aggregate", "write")}},
        indent=2))
    say(f"extract: done in {dt:.1f} s ({n_images / dt:.1f} img/s, {timings.rows} rows); "
        f"cache {size / 2**20:.1f} MiB in {ws.cache_dir}")
    _record(cfg, ws, plan, st)
    _probe(cfg, ws, dev)


def _record(cfg: Config, ws: Workspace, plan: Any, st: dict[str, Any]) -> None:
    """The content of the data set the cache's key was computed for (``cache/dataset.json``),
    so that a copy of it with new mtimes keeps the cache (``stages.extract.plan.same_data``)."""
    from stages.extract.plan import record_content

    record_content(cfg, ws.cache_dir, st["train"].info().settings["dataset"], plan.listed)


def _probe(cfg: Config, ws: Workspace, dev: torch.device) -> None:
    """The held-out probe of config.toml's split, part of the cache (encoded once)."""
    from stages.train.probe import extract_probe

    path = extract_probe(cfg, ws.cache_dir, dev, say)
    if path is not None:
        say(f"extract: held-out probe in {path}")

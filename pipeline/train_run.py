"""``clad train``: bookkeeping around stage 2 (keys, snapshots, skip when done)."""

from __future__ import annotations

import shutil
import time
from typing import Any

import torch

from cache.store import FeatureStore
from core.errors import StaleError
from core.files import read_json, remove_stale_temps
from core.layout import RunFiles
from pipeline.config import check_sets_used, load_config, save_config
from pipeline.progress import progress, say
from pipeline.runs import run_config, saved_overrides, write_overrides
from pipeline.workspace import Workspace, extract_state


def _bar(phase: str, done: int, total: int) -> Any:
    b = progress(total, f"train {phase}", unit="epoch")
    b.update(done)
    return b


def resolve_overrides(ws: Workspace, name: str, cli: dict[str, Any], restart: bool) -> dict[str, Any]:
    """The run's choices: this command line's, else the run's remembered ones
    (--profile, --head, --set). ``--restart`` forgets every remembered choice."""
    base = ws.config()
    previous = {} if restart else saved_overrides(ws, name)
    overrides = {k: v for k, v in cli.items() if v}
    if not overrides.get("profile"):
        overrides["profile"] = previous.get("profile") or base.train.profile
    for key in ("sets", "head"):
        if not cli.get(key) and previous.get(key):
            overrides[key] = previous[key]
    overrides.setdefault("head", base.train.head)  # remembered, so a later change of the default leaves it alone
    return overrides


def train_run(ws: Workspace, name: str, cli: dict[str, Any], device: str, restart: bool) -> None:
    from cache.stream import TrainCache
    from stages.calibrate import calibrate_run
    from stages.extract import resolve_device
    from stages.heads import accepted_run_keys, head_class, run_changes, run_key
    from stages.train import train_context, train_head, write_summary

    base = ws.config()
    files = RunFiles(ws.run_dir(name))
    for p in remove_stale_temps(files.root) if files.root.is_dir() else []:
        say(f"train: removed {p.name}, left by an interrupted process")
    overrides = resolve_overrides(ws, name, cli, restart)
    cfg = run_config(base, overrides)  # checks every value before anything is written
    check_sets_used(cfg, cli.get("sets") or [])  # this command line's; a run's remembered ones were checked
    ex = extract_state(ws, cfg)
    if ex.state != "done":
        raise StaleError(f"{ws.cache_dir}: feature cache is {ex.state}: {ex.detail}")
    summary = read_json(files.summary)
    if restart:
        shutil.rmtree(files.root, ignore_errors=True)
        summary = None
    elif summary is not None:
        if summary.get("train_key") in accepted_run_keys(cfg):
            write_overrides(ws, name, overrides)  # the same settings, maybe spelled differently
            say(f"train: run {name!r} is already trained with these settings; nothing to do")
            return
        changes = run_changes(load_config(files.config), cfg)
        raise StaleError(f"run {name!r} was trained with other settings ({'; '.join(changes[:4])}); "
                         f"use another --run name or add --restart to retrain it")
    elif files.config.is_file() and files.latest.is_file():
        old = load_config(files.config)
        if run_key(old) != run_key(cfg):
            changes = run_changes(old, cfg)
            raise StaleError(f"run {name!r} has a partial training with other settings ({'; '.join(changes[:4])}); "
                             "use another --run name or add --restart")
    files.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, files.config)
    write_overrides(ws, name, overrides)
    store = FeatureStore(ws.cache_dir / "train.zarr")
    cache = TrainCache(store)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    say(f"train: run {name!r}, head {cfg.train.head} ({head_class(cfg.train.head).summary}), "
        f"profile {cfg.train.profile}, on {dev.type}")
    ctx = train_context(cfg, cache, files, dev, store.info().key, say, _bar)
    head, result = train_head(cfg, ctx)
    t_train = time.perf_counter() - t0
    cal = calibrate_run(cfg, head, ctx, ctx.run_key)
    result.update({"train_key": ctx.run_key, "head": cfg.train.head, "seconds_train": t_train,
                   "seconds_total": time.perf_counter() - t0, "device": dev.type,
                   "torch_threads": torch.get_num_threads(),
                   "thresholds": {c: v["threshold"] for c, v in cal["classes"].items()}})
    write_summary(files, result)
    say(f"train: done in {time.perf_counter() - t0:.1f} s (calibration included); model in {files.final}; "
        f"per-class thresholds in {files.calibration}")

"""``clad train``: bookkeeping around stage 2 (keys, snapshots, skip when done)."""

from __future__ import annotations

import shutil
import time
from typing import Any

import torch

from cache.store import FeatureStore
from core.errors import CladError, StaleError
from core.files import read_json
from pipeline.config import load_config, save_config, training_changes
from pipeline.progress import progress, say
from pipeline.runs import run_config, saved_overrides, write_overrides
from pipeline.workspace import Workspace, extract_state


def train_run(ws: Workspace, name: str, cli: dict[str, Any], device: str, restart: bool) -> None:
    from cache.stream import TrainCache
    from stages.extract import resolve_device
    from stages.train import CladTrainer, RunFiles, train_knn, write_summary

    base = ws.config()
    rd = ws.run_dir(name)
    previous = saved_overrides(ws, name)
    overrides = {k: v for k, v in cli.items() if v}
    if not overrides.get("profile"):
        overrides["profile"] = previous.get("profile") or base.train.profile
    if not cli.get("sets") and previous.get("sets") and not restart:
        overrides["sets"] = previous["sets"]
    if not cli.get("head") and previous.get("head"):
        overrides["head"] = previous["head"]
    cfg = run_config(base, overrides)
    ex = extract_state(ws, cfg)
    if ex.state != "done":
        raise StaleError(f"{ws.cache_dir}: feature cache is {ex.state} ({ex.detail}); "
                         "run 'clad extract WORK' first")
    files = RunFiles(rd)
    summary = read_json(files.summary)
    if restart:
        shutil.rmtree(rd, ignore_errors=True)
        summary = None
    elif summary is not None:
        if summary.get("train_key") == cfg.train_key():
            write_overrides(ws, name, overrides)  # the same settings, maybe spelled differently
            say(f"train: run {name!r} is already trained with these settings; nothing to do")
            return
        changes = training_changes(load_config(rd / "config.toml"), cfg)
        raise StaleError(f"run {name!r} was trained with other settings ({'; '.join(changes[:4])}); "
                         f"use another --run name or add --restart to retrain it")
    elif (rd / "config.toml").is_file() and files.latest.is_file():
        old = load_config(rd / "config.toml")
        if old.train_key() != cfg.train_key():
            changes = training_changes(old, cfg)
            raise StaleError(f"run {name!r} has a partial training with other settings ({'; '.join(changes[:4])}); "
                             "use another --run name or add --restart")
    rd.mkdir(parents=True, exist_ok=True)
    save_config(cfg, rd / "config.toml")
    write_overrides(ws, name, overrides)
    store = FeatureStore(ws.cache_dir / "train.zarr")
    cache = TrainCache(store)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    say(f"train: run {name!r}, head {cfg.train.head}, profile {cfg.train.profile}, on {dev.type}")
    if cfg.train.head == "knn":
        result = train_knn(cfg, cache, files, store.info().key, dev, say)
    elif cfg.train.head == "clad":
        trainer = CladTrainer(cfg, cache, files, dev, store.info().key)

        def bar(phase: str, done: int, total: int) -> Any:
            b = progress(total, f"train {phase}", unit="epoch")
            b.update(done)
            return b

        result = trainer.run(bar, say)
    else:
        raise CladError(f"train.head={cfg.train.head!r}: choose clad or knn")
    result.update({"train_key": cfg.train_key(), "head": cfg.train.head,
                   "seconds_total": time.perf_counter() - t0, "device": dev.type,
                   "torch_threads": torch.get_num_threads()})
    write_summary(files, result)
    say(f"train: done in {time.perf_counter() - t0:.1f} s; threshold {result['threshold']:.4g} "
        f"(from held-out training normals); model in {files.final}")

"""``clad train``: bookkeeping around stage 2 (keys, snapshots, skip when done).

Under ``torchrun`` with several processes (``core.distributed``) rank 0 alone
does the bookkeeping and writes the run's files; it hands the resolved
configuration (or "nothing to do", or its error) to the other ranks, which
train alongside and return before calibration.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from cache.store import FeatureStore
from core import distributed
from core.errors import CladError, StaleError
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


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure of torch or numpy, on the CPU or a GPU (not a bug)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower()
                                              or "DefaultCPUAllocator: can't allocate memory" in text)


@contextmanager
def out_of_memory_is_one_line(cfg: Any, device: str) -> Iterator[None]:
    """Turn an allocation failure while training into one line naming the head's
    batch settings (their values and a smaller one to try); the run resumes from
    its last checkpoint when trained again."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        settings = cfg.train.head_settings()
        batches = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if "batch" in f.name}
        what = (", ".join(f"{k} = {v}" for k, v in batches.items()) if batches else "")
        fix = ("lower " + " or ".join(f"--set {k}={max(1, int(v) // 4)}" for k, v in batches.items())
               if batches else f"head {cfg.train.head} has no batch setting; free memory or use a larger machine")
        raise CladError(f"out of memory on the {device} while training head {cfg.train.head}"
                        + (f" ({what})" if what else "") + f"; {fix}, and run the same command again "
                        "(it resumes from the last checkpoint)") from None


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
    from core.devices import resolve_device

    dev = distributed.init_from_env(resolve_device(device))
    try:
        cfg = distributed.on_main(lambda: _prepare(ws, name, cli, restart))
        if cfg is not None:
            _train(ws, name, cfg, dev)
    finally:
        distributed.close()


def _prepare(ws: Workspace, name: str, cli: dict[str, Any], restart: bool) -> Any:
    """The run's configuration, checked, with the run's folder ready; None when it is trained already."""
    from stages.heads import accepted_run_keys, head_class, head_names, run_changes, run_key

    base = ws.config()
    files = RunFiles(ws.run_dir(name))
    for p in remove_stale_temps(files.root) if files.root.is_dir() else []:
        say(f"train: removed {p.name}, left by an interrupted process")
    overrides = resolve_overrides(ws, name, cli, restart)
    cfg = run_config(base, overrides)  # checks every value before anything is written
    check_sets_used(cfg, cli.get("sets") or [])  # this command line's; a run's remembered ones were checked
    if distributed.launched() and not head_class(cfg.train.head).distributed:
        able = ", ".join(n for n in head_names() if head_class(n).distributed)
        raise CladError(f"head {cfg.train.head} cannot train on several processes (WORLD_SIZE="
                        f"{distributed.world_size()}): train it in one process, without torchrun "
                        f"(heads that can: {able})")
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
            return None
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
    return cfg


def _train(ws: Workspace, name: str, cfg: Any, dev: torch.device) -> None:
    """Train (every rank), then calibrate and write the summary (rank 0)."""
    from cache.stream import TrainCache
    from stages.heads import head_class
    from stages.train.calibrate import calibrate_run
    from stages.train.stage import train_context, train_head, write_summary

    files = RunFiles(ws.run_dir(name))
    store = FeatureStore(ws.cache_dir / "train.zarr")
    cache = TrainCache(store)
    t0 = time.perf_counter()
    on = f"{dev.type}" + (f", {distributed.world_size()} processes" if distributed.active() else "")
    say(f"train: run {name!r}, head {cfg.train.head} ({head_class(cfg.train.head).summary}), "
        f"profile {cfg.train.profile}, on {on}")
    ctx = train_context(cfg, cache, files, dev, store.info().key, say, _bar)
    with out_of_memory_is_one_line(cfg, dev.type):
        head, result = train_head(cfg, ctx)
        if not distributed.is_main():
            return  # rank 0 calibrates and writes the summary alone
        t_train = time.perf_counter() - t0
        cal = calibrate_run(cfg, head, ctx, ctx.run_key)
    result.update({"train_key": ctx.run_key, "head": cfg.train.head, "seconds_train": t_train,
                   "seconds_total": time.perf_counter() - t0, "device": dev.type,
                   "torch_threads": torch.get_num_threads(),
                   "thresholds": {c: v["threshold"] for c, v in cal["classes"].items()}})
    write_summary(files, result)
    say(f"train: done in {time.perf_counter() - t0:.1f} s (calibration included); model in {files.final}; "
        f"per-class thresholds in {files.calibration}")

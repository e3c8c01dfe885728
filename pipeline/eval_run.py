"""``clad calibrate``, ``clad evaluate`` and ``clad score``: checks, progress and
summaries around the calibration and stage 3."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import click

from core.errors import CladError, StaleError
from core.files import read_json, remove_stale_temps
from core.layout import RunFiles
from core.settings import Config
from pipeline.config import load_config
from pipeline.progress import progress, say
from pipeline.runs import run_states
from pipeline.workspace import Workspace, extract_state


def trained_config(ws: Workspace, name: str) -> tuple[Config, str]:
    """The run's configuration (evaluation and calibration settings from the
    workspace's config.toml: they do not touch training) and its train key."""
    files = RunFiles(ws.run_dir(name))
    summary = read_json(files.summary)
    if summary is None:
        raise CladError(f"run {name!r} has no finished training; run 'clad train {ws.root} --run {name}'")
    cfg = load_config(files.config)
    current = ws.config()
    states = run_states(ws, current, name, extract_state(ws, current))
    if states[0].state != "done":
        raise StaleError(f"run {name!r} is {states[0].state}: {states[0].detail}")
    return replace(cfg, evaluate=current.evaluate, calibrate=current.calibrate), summary["train_key"]


def calibrate_cli(ws: Workspace, name: str, device: str, force: bool = True) -> None:
    """(Re)calibrate a trained run's verdict thresholds from training data only."""
    from cache.store import FeatureStore
    from cache.stream import TrainCache
    from core.devices import resolve_device
    from stages.heads import load_trained_head
    from stages.train.calibrate import calibrate_run, calibration_key, read_calibration
    from stages.train.stage import train_context

    cfg, key = trained_config(ws, name)
    files = RunFiles(ws.run_dir(name))
    cal = read_calibration(files)
    if not force and cal is not None and cal.get("key") == calibration_key(cfg, key):
        return
    t0 = time.perf_counter()
    dev = resolve_device(device)
    head, _ = load_trained_head(files.final, dev)
    store = FeatureStore(ws.cache_dir / "train.zarr")
    ctx = train_context(cfg, TrainCache(store), files, dev, store.info().key, say, lambda *a: None)
    cal = calibrate_run(cfg, head, ctx, key)
    say(f"calibrate: run {name!r}: {len(cal['classes'])} class thresholds ({cal['source']}) in "
        f"{time.perf_counter() - t0:.1f} s; {files.calibration}")


def evaluate_run_cli(ws: Workspace, name: str, device: str) -> None:
    from core.devices import resolve_device
    from stages.evaluate.report import metrics_table, verdict_table
    from stages.evaluate.stage import evaluate_run
    from stages.train.calibrate import verdict_key

    files = RunFiles(ws.run_dir(name))
    for gone in remove_stale_temps(files.root, recursive=False, of="eval"):
        say(f"evaluate: removed {gone}, left by an interrupted evaluation")
    calibrate_cli(ws, name, device, force=False)  # a missing or stale calibration is redone first
    cfg, key = trained_config(ws, name)
    files = RunFiles(ws.run_dir(name))
    eval_key = cfg.evaluate_key(key + verdict_key(cfg, files, key))
    done = read_json(files.metrics)
    if done and done.get("evaluate_key") == eval_key:
        say(f"evaluate: run {name!r} is already evaluated with these settings; nothing to do")
        click.echo(metrics_table(done["per_class"], done["mean"]))
        click.echo(verdict_table(done["per_class"]))
        return
    t0 = time.perf_counter()
    result = evaluate_run(cfg, ws.cache_dir, files, key, eval_key, resolve_device(device), say,
                          lambda n: progress(n, "evaluate", unit="img"))
    click.echo(metrics_table(result["per_class"], result["mean"]))
    click.echo(verdict_table(result["per_class"]))
    say(f"evaluate: done in {time.perf_counter() - t0:.1f} s; report {files.eval_dir / 'report.md'}, "
        f"pictures in {files.eval_dir / 'figures'}")


def score_cli(ws: Workspace, name: str, paths: list[str], out_dir: Path | None, device: str,
              class_name: str, scheduler: str = "") -> None:
    from core.devices import resolve_device
    from stages.evaluate.score import check_out_dir, expand_inputs, score_images
    from stages.train.calibrate import ensure_calibrated

    cfg, key = trained_config(ws, name)
    files = RunFiles(ws.run_dir(name))
    ensure_calibrated(cfg, files, key)
    out = out_dir or files.scores_dir
    check_out_dir(out)
    inputs, passed_over = expand_inputs(paths, out)
    if passed_over:
        say(f"score: skipped {passed_over} image(s) inside the output folder {out} or hidden folders "
            "(earlier heat maps and temporaries are not inputs)")
    t0 = time.perf_counter()
    results = score_images(cfg, files, inputs, out, resolve_device(device), say,
                           lambda n: progress(n, "score", unit="img"), class_name, scheduler=scheduler)
    counts: Counter = Counter((r["class"], r["verdict"]) for r in results)
    classes = sorted({c for c, _ in counts})
    for c in classes:
        say(f"score: {c or '(unread)'}: " + ", ".join(
            f"{counts[(c, v)]} {v}" for v in ("anomalous", "normal", "out-of-distribution", "unjudged", "unreadable")
            if counts[(c, v)]))
    bad = sum(r["verdict"] == "anomalous" for r in results)
    skipped = sum(r["verdict"] == "unreadable" for r in results)
    say(f"score: {len(results)} images in {time.perf_counter() - t0:.1f} s: {bad} anomalous, "
        f"{sum(r['verdict'] == 'normal' for r in results)} normal, "
        f"{sum(r['verdict'] == 'out-of-distribution' for r in results)} out of distribution (fit no trained class), "
        f"{skipped} unreadable; table {out / 'results.csv'}, heat maps in {out}")
    if skipped == len(results):
        raise CladError(f"none of the {skipped} images could be read (see the lines above); "
                        "nothing was scored")

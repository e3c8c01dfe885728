"""``clad evaluate`` and ``clad score``: checks, progress and summaries around stage 3."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from core.errors import CladError, StaleError
from core.files import read_json
from pipeline.config import load_config
from pipeline.progress import progress, say
from pipeline.runs import run_states
from pipeline.workspace import Workspace, extract_state


def _trained_config(ws: Workspace, name: str) -> Any:
    rd = ws.run_dir(name)
    if not (rd / "train.json").is_file():
        raise CladError(f"run {name!r} has no finished training; run 'clad train {ws.root} --run {name}'")
    cfg = load_config(rd / "config.toml")
    current = ws.config()
    states = run_states(ws, current, name, extract_state(ws, current))
    if states[0].state != "done":
        raise StaleError(f"run {name!r} is {states[0].state}: {states[0].detail}")
    # evaluation settings come from the workspace's config.toml (they do not touch training)
    from dataclasses import replace

    return replace(cfg, evaluate=current.evaluate)


def evaluate_run_cli(ws: Workspace, name: str, device: str) -> None:
    from stages.evaluate import evaluate_run, metrics_table
    from stages.extract import resolve_device

    cfg = _trained_config(ws, name)
    rd = ws.run_dir(name)
    done = read_json(rd / "eval" / "metrics.json")
    if done and done.get("evaluate_key") == cfg.evaluate_key():
        say(f"evaluate: run {name!r} is already evaluated with these settings; nothing to do")
        click.echo(metrics_table(done["per_class"], done["mean"]))
        return
    t0 = time.perf_counter()
    result = evaluate_run(cfg, ws.cache_dir, rd, resolve_device(device), say,
                          lambda n: progress(n, "evaluate", unit="img"))
    click.echo(metrics_table(result["per_class"], result["mean"]))
    say(f"evaluate: done in {time.perf_counter() - t0:.1f} s; report {rd / 'eval' / 'report.md'}, "
        f"pictures in {rd / 'eval' / 'figures'}")


def score_cli(ws: Workspace, name: str, paths: list[str], out_dir: Path | None, device: str) -> None:
    from stages.extract import resolve_device
    from stages.score import expand_inputs, score_images

    cfg = _trained_config(ws, name)
    files = expand_inputs(paths)
    out = out_dir or ws.run_dir(name) / "scores"
    t0 = time.perf_counter()
    results = score_images(cfg, ws.run_dir(name), files, out, resolve_device(device), say,
                           lambda n: progress(n, "score", unit="img"))
    bad = sum(r["verdict"] == "anomalous" for r in results)
    skipped = sum(r["verdict"] == "unreadable" for r in results)
    say(f"score: {len(results)} images in {time.perf_counter() - t0:.1f} s: {bad} anomalous, "
        f"{len(results) - bad - skipped} normal, {skipped} unreadable; table {out / 'results.csv'}, "
        f"heat maps in {out}")

"""Runs: the configuration each run saw, and whether its outputs are current.

A run's configuration is the workspace's config.toml plus the run's own
command-line choices (``--profile``, ``--head``, ``--set``), kept in
``runs/NAME/overrides.json`` so that ``clad status`` can tell when an edit of
config.toml made the run stale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.files import read_json, write_atomic
from core.layout import RunFiles
from pipeline.config import Config, apply_sets, load_config, with_run_choices
from pipeline.workspace import StageState, Workspace


def run_config(base: Config, overrides: dict[str, Any]) -> Config:
    """The workspace configuration with a run's ``--profile``, ``--head`` and ``--set``."""
    cfg = with_run_choices(base, overrides.get("profile") or "", overrides.get("head") or "")
    return apply_sets(cfg, overrides.get("sets", []))


def saved_overrides(ws: Workspace, name: str) -> dict[str, Any]:
    """The run's remembered command-line choices. Its head is always among
    them: runs that took the default head before the default changed have it
    filled in from their own configuration snapshot."""
    files = RunFiles(ws.run_dir(name))
    out = read_json(files.overrides) or {}
    if not out.get("head") and files.config.is_file():
        out["head"] = load_config(files.config).train.head
    return out


def write_overrides(ws: Workspace, name: str, overrides: dict[str, Any]) -> None:
    write_atomic(RunFiles(ws.run_dir(name)).overrides, json.dumps(overrides, indent=2))


def unreadable(path: Path) -> str:
    """Why the checkpoint ``path`` cannot be loaded ("" when it can): status checks contents, not names."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, flipped bytes, a foreign pickle ...
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
    return ""


def run_states(ws: Workspace, cfg: Config, name: str, extract: StageState) -> list[StageState]:
    """Train, calibrate and evaluate state of one run, against the current config.toml."""
    from stages.heads import accepted_run_keys, head_class, run_changes
    from stages.train.calibrate import calibration_key, verdict_key

    files = RunFiles(ws.run_dir(name))
    expected = run_config(cfg, saved_overrides(ws, name))
    summary = read_json(files.summary)
    out = []
    if summary is None:
        prog = head_class(expected.train.head).progress(files)
        damage = unreadable(files.latest) if files.latest.is_file() else ""
        if damage:
            out.append(StageState(f"train[{name}]", "corrupt", f"{files.latest} cannot be read ({damage}); "
                                  f"run 'clad train WORK --run {name} --restart'"))
        elif files.latest.is_file():
            out.append(StageState(f"train[{name}]", "partial", f"run 'clad train WORK --run {name}' to finish",
                                  prog))
        else:
            out.append(StageState(f"train[{name}]", "missing", f"run 'clad train WORK --run {name}'"))
    elif summary.get("train_key") not in accepted_run_keys(expected):
        used = load_config(files.config) if files.config.is_file() else expected
        changes = run_changes(used, expected)
        out.append(StageState(f"train[{name}]", "stale", "; ".join(changes[:5]) +
                              f" (re-run 'clad train WORK --run {name} --restart')", extra={"changes": changes}))
    elif extract.state != "done":
        out.append(StageState(f"train[{name}]", "stale", f"the feature cache is {extract.state}: {extract.detail}"))
    else:
        out.append(StageState(f"train[{name}]", "done", f"{summary.get('head', 'clad')} head"))
    trained = out[-1].state == "done"
    key = summary.get("train_key", "") if summary else ""
    cal = read_json(files.calibration)
    if cal is None:
        out.append(StageState(f"calibrate[{name}]", "missing", f"run 'clad calibrate WORK --run {name}'"))
    elif not trained or cal.get("key") != calibration_key(expected, key):
        out.append(StageState(f"calibrate[{name}]", "stale", f"re-run 'clad calibrate WORK --run {name}'"))
    else:
        out.append(StageState(f"calibrate[{name}]", "done", f"{len(cal['classes'])} class thresholds"))
    metrics = read_json(files.metrics)
    if metrics is None:
        out.append(StageState(f"evaluate[{name}]", "missing", f"run 'clad evaluate WORK --run {name}'"))
    elif not trained or metrics.get("evaluate_key") != expected.evaluate_key(key + verdict_key(expected, files, key)):
        out.append(StageState(f"evaluate[{name}]", "stale", f"re-run 'clad evaluate WORK --run {name}'"))
    else:
        out.append(StageState(f"evaluate[{name}]", "done", _headline(metrics)))
    return out


def _headline(metrics: dict[str, Any]) -> str:
    m = metrics.get("mean", {})
    return (f"image AUROC {m.get('image_auroc', float('nan')):.3f}, pixel AUROC "
            f"{m.get('pixel_auroc', float('nan')):.3f}, AUPRO {m.get('aupro', float('nan')):.3f}")

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

from core.files import read_json
from pipeline.config import Config, apply_sets, load_config, training_changes, with_run_choices, write_atomic
from pipeline.workspace import StageState, Workspace


def run_config(base: Config, overrides: dict[str, Any]) -> Config:
    """The workspace configuration with a run's ``--profile``, ``--head`` and ``--set``."""
    cfg = with_run_choices(base, overrides.get("profile") or "", overrides.get("head") or "")
    return apply_sets(cfg, overrides.get("sets", []))


def overrides_path(ws: Workspace, name: str) -> Path:
    return ws.run_dir(name) / "overrides.json"


def saved_overrides(ws: Workspace, name: str) -> dict[str, Any]:
    return read_json(overrides_path(ws, name)) or {}


def run_states(ws: Workspace, cfg: Config, name: str, extract: StageState) -> list[StageState]:
    """Train and evaluate state of one run, against the current config.toml."""
    rd = ws.run_dir(name)
    expected = run_config(cfg, saved_overrides(ws, name))
    summary = read_json(rd / "train.json")
    snap = rd / "config.toml"
    out = []
    if summary is None:
        latest = rd / "checkpoints" / "latest.pt"
        if latest.is_file():
            done, total = _epochs_done(latest, expected)
            out.append(StageState(f"train[{name}]", "partial", f"run 'clad train WORK --run {name}' to finish",
                                  (done, total)))
        else:
            out.append(StageState(f"train[{name}]", "missing", f"run 'clad train WORK --run {name}'"))
    elif summary.get("train_key") != expected.train_key():
        used = load_config(snap) if snap.is_file() else expected
        changes = training_changes(used, expected)
        out.append(StageState(f"train[{name}]", "stale", "; ".join(changes[:5]) +
                              f" (re-run 'clad train WORK --run {name} --restart')", extra={"changes": changes}))
    elif extract.state != "done":
        out.append(StageState(f"train[{name}]", "stale", f"the feature cache is {extract.state}"))
    else:
        out.append(StageState(f"train[{name}]", "done", f"{summary.get('head', 'clad')} head"))
    metrics = read_json(rd / "eval" / "metrics.json")
    if metrics is None:
        out.append(StageState(f"evaluate[{name}]", "missing", f"run 'clad evaluate WORK --run {name}'"))
    elif out[-1].state != "done" or metrics.get("evaluate_key") != expected.evaluate_key():
        out.append(StageState(f"evaluate[{name}]", "stale", f"re-run 'clad evaluate WORK --run {name}'"))
    else:
        out.append(StageState(f"evaluate[{name}]", "done", _headline(metrics)))
    return out


def _epochs_done(latest: Path, cfg: Config) -> tuple[int, int]:
    """Epochs finished over both phases, from the last checkpoint."""
    import torch

    t = cfg.train
    phases = ([t.epochs_contrastive] if t.use_contrastive and t.epochs_contrastive > 0 else []) + [t.epochs_finetune]
    try:
        ck = torch.load(latest, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a checkpoint being replaced right now
        return 0, sum(phases)
    return sum(phases[: ck["phase"]]) + ck["epoch"], sum(phases)


def _headline(metrics: dict[str, Any]) -> str:
    m = metrics.get("mean", {})
    return (f"image AUROC {m.get('image_auroc', float('nan')):.3f}, pixel AUROC "
            f"{m.get('pixel_auroc', float('nan')):.3f}, AUPRO {m.get('aupro', float('nan')):.3f}")


def write_overrides(ws: Workspace, name: str, overrides: dict[str, Any]) -> None:
    write_atomic(overrides_path(ws, name), json.dumps(overrides, indent=2))

"""The run-directory layout: the one place that names the files of ``runs/NAME``.

``pipeline`` (bookkeeping, status) and ``stages`` (training, calibration,
evaluation, scoring) both find a run's files here, so a file moves in one
place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFiles:
    """Paths inside one run folder ``WORK/runs/NAME``."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        """The configuration as this run saw it."""
        return self.root / "config.toml"

    @property
    def overrides(self) -> Path:
        """The run's own command-line choices (--profile, --head, --set)."""
        return self.root / "overrides.json"

    @property
    def summary(self) -> Path:
        """train.json: written last by training; its presence means 'trained'."""
        return self.root / "train.json"

    @property
    def train_cache(self) -> Path:
        """The workspace's training cache (``WORK/cache/train.zarr``): the run was trained on it,
        and a memory-bank head reads its bank rows from it."""
        return self.root.parents[1] / "cache" / "train.zarr"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest(self) -> Path:
        return self.checkpoints / "latest.pt"

    @property
    def final(self) -> Path:
        return self.checkpoints / "final.pt"

    def best(self, phase: str) -> Path:
        """The best model of a phase that selects one (``best_<phase>.pt``)."""
        return self.checkpoints / f"best_{phase}.pt"

    @property
    def calibration(self) -> Path:
        """calibration.json: per-class thresholds, routing statistics, their evidence."""
        return self.root / "calibration.json"

    @property
    def routing(self) -> Path:
        """routing.pt: training image descriptors per class (which class an image is)."""
        return self.root / "routing.pt"

    @property
    def user_thresholds(self) -> Path:
        """thresholds.toml: per-class thresholds set by the user (they win)."""
        return self.root / "thresholds.toml"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def metrics(self) -> Path:
        return self.eval_dir / "metrics.json"

    @property
    def scores_dir(self) -> Path:
        return self.root / "scores"

"""What a head's training reads: the cache, labels, held-out images, settings,
the run's files and how to report progress. Built once by ``stages.train.stage``;
used by the heads and by the epoch loop they share (``stages.train.epochs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cache.stream import TrainCache
from core.layout import RunFiles
from core.settings import FeatureConfig, TrainConfig

Log = Callable[[str], None]
MakeBar = Callable[[str, int, int], Any]  # (phase, done, total) -> bar with update/set_postfix/close


@dataclass
class TrainContext:
    """Everything a head's training reads, built once by ``stages.train.stage``."""

    cache: TrainCache
    held: np.ndarray  # [n_images] bool: held out of training
    labels: np.ndarray  # [n_images] int64: class (or pseudo-class) label per image
    n_labels: int
    train: TrainConfig  # run-level settings (seed, holdout, ...)
    features: FeatureConfig
    device: torch.device
    files: RunFiles
    cache_key: str
    run_key: str
    accepted_keys: tuple[str, ...]  # run keys a resumable checkpoint may carry (this one, older spellings)
    log: Log
    make_bar: MakeBar
    # the held-out probe (stages.train.probe): score_maps -> probe metrics; NaN metrics where there is none
    probe: Callable[[Callable[[torch.Tensor], torch.Tensor]], dict[str, float]] = lambda _score: {}
    # the probe itself (per class: features, masks; None without held-out images) and one class's
    # metrics from its patch scores [n, H*W] and masks (stages.train.probe.class_probe_metrics)
    probe_set: Callable[[], Any] = lambda: None
    probe_class: Callable[[torch.Tensor, np.ndarray], dict[str, float]] = lambda _s, _m: {}

    @property
    def seed(self) -> int:
        return self.train.seed

"""Stage 2: train the configured head on the cached features (resumable, never re-extracts).

The head is found in the registry by name; this module only builds what
every head's training reads (labels, held-out images, keys, device), lets the
head fit, and writes its final checkpoint atomically.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch

from cache.stream import TrainCache
from core import distributed
from core.files import save_torch_atomic, write_atomic
from core.layout import RunFiles
from core.settings import Config
from stages.heads import Head, TrainContext, accepted_run_keys, head_class, run_key
from stages.train.context import Log, MakeBar
from stages.train.labels import holdout_images, image_labels
from stages.train.probe import ProbeSet, ScoreMaps, class_probe_metrics, load_or_build_probe, probe_metrics


def train_context(cfg: Config, cache: TrainCache, files: RunFiles, device: torch.device, cache_key: str,
                  log: Log, make_bar: MakeBar) -> TrainContext:
    """Labels, held-out images and keys of a run, for any head."""
    t = cfg.train
    held = holdout_images(cache, t.holdout, t.seed)
    if head_class(t.head).uses_labels:
        labels, n_labels = image_labels(cfg.data.labels, cache, t.pseudo_k, t.seed)
    else:
        labels, n_labels = cache.image_class.astype("int64"), len(cache.class_names)
    @functools.cache
    def probe_set() -> ProbeSet | None:  # encoded on first use, then kept (and on disk for the next run)
        return load_or_build_probe(cfg, cache, held, cache_key, device, log)

    @functools.cache
    def epoch_probe() -> ProbeSet | None:  # the first versions of each image: scored every epoch
        return None if probe_set() is None else probe_set().first_versions()

    def probe(score_maps: ScoreMaps) -> dict[str, float]:
        size = cfg.features.output_size
        return probe_metrics(epoch_probe(), score_maps, size, cfg.evaluate.sigma, cfg.evaluate.aupro_fpr)

    def probe_class(scores: torch.Tensor, masks: Any) -> dict[str, float]:
        return class_probe_metrics(scores, masks, cfg.features.output_size, cfg.evaluate.sigma, cfg.evaluate.aupro_fpr)

    return TrainContext(cache, held, labels, n_labels, t, cfg.features, device, files, cache_key, run_key(cfg),
                        accepted_run_keys(cfg), log, make_bar, probe, probe_set, probe_class)


def train_head(cfg: Config, ctx: TrainContext) -> tuple[Head, dict[str, Any]]:
    """Fit the configured head (resuming where a checkpoint exists) and save ``final.pt`` (rank 0)."""
    cls = head_class(cfg.train.head)
    head, summary = cls.fit(cfg.train.head_settings(), ctx)
    if not distributed.is_main():  # a distributed run: rank 0 writes and probes alone
        return head, summary
    save_torch_atomic(head.checkpoint(), ctx.files.final)
    summary["probe"] = ctx.probe(head.score_maps)  # the final model on the held-out probe
    if (probe := ctx.probe_set()) is not None:  # what the probe held
        summary["probe_images"] = probe.image_counts()
    summary.setdefault("labels", cfg.data.labels if cls.uses_labels else "classes")
    summary.setdefault("image_labels", ctx.labels.tolist())
    return head, summary


def write_summary(files: RunFiles, summary: dict[str, Any]) -> None:
    """train.json, written last: its presence means the run is trained."""
    write_atomic(files.summary, json.dumps(summary, indent=2, default=float))

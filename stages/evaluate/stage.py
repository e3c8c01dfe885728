"""Stage 3: score the cached test features with a trained head; metrics and pictures.

Test images are processed class by class (the cache is stored in class
order), so memory holds one class's maps at a time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache.store import FeatureStore
from core.errors import CladError, StaleError
from core.files import remove_stale_temps, swap_into_place, temp_dir, write_atomic
from core.layout import RunFiles
from core.settings import Config
from stages.evaluate.figures import curves, overlay, score_histogram, score_strips
from stages.evaluate.report import METRICS, VERDICT, csv_table, report_markdown
from stages.extract.data import load_image
from stages.heads import load_trained_head
from stages.maps import anomaly_maps, image_scores
from stages.metrics import class_metrics, verdict_metrics
from stages.train.calibrate import load_router, read_calibration, verdicts_in_force
from stages.train.routing import descriptors


def iter_classes(store: FeatureStore) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Yield (class, images) with each image's features, label, mask and path."""
    info = store.info()
    names = info.class_names
    current, items = None, []
    for shard in range(len(info.plan)):
        if (why := store.problem(shard)) is not None:
            raise CladError(f"{store.shard_path(shard)}: {why}; run 'clad extract WORK' to extract it")
        g = store.open_shard(shard)
        attrs = g.attrs.asdict()
        cls, lab = store.read(shard, "class_id", group=g), store.read(shard, "label", group=g)
        for i in range(len(cls)):
            name = names[int(cls[i])]
            if current is not None and name != current:
                yield current, items
                items = []
            current = name
            items.append({"features": store.read(shard, "features", i, g), "label": int(lab[i]),
                          "mask": store.read(shard, "mask", i, g),
                          "path": attrs["paths"][i], "image_id": attrs["image_ids"][i],
                          "defect": attrs["defects"][i]})
    if current is not None:
        yield current, items


def evaluate_run(cfg: Config, cache_dir: Path, files: RunFiles, train_key: str, eval_key: str,
                 device: torch.device, log: Callable[[str], None], bar: Callable[[int], Any]) -> dict[str, Any]:
    """Score every test image, compute metrics and verdict quality per class, draw, write eval/."""
    run_dir = files.root
    store = FeatureStore(cache_dir / "test.zarr")
    head, meta = load_trained_head(files.final, device)
    if meta["cache_key"] != store.info().key:
        raise StaleError(f"{run_dir}: trained on another feature cache; re-train it "
                         f"('clad train WORK --run {run_dir.name} --restart')")
    size = cfg.features.output_size
    verdicts = verdicts_in_force(read_calibration(files), files, cfg.calibrate)
    router = load_router(files)
    final = run_dir / "eval"
    for gone in remove_stale_temps(run_dir, recursive=False, of=final.name):
        log(f"evaluate: removed {gone}, left by an interrupted process")
    tmp = temp_dir(final)  # .eval.tmp-PID, swapped into place when complete
    figs = tmp / "figures"
    per_class: dict[str, dict[str, float]] = {}
    figures: dict[str, list[str]] = {}
    all_scores: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    n_total = sum(len(p) for p in store.info().plan)
    progress = bar(n_total)
    for name, items in iter_classes(store):
        rows = np.stack([it["features"] for it in items]).astype(np.float32)
        scores = head.score_maps(torch.from_numpy(rows))
        maps = anomaly_maps(scores, size, cfg.evaluate.sigma)
        masks = np.stack([it["mask"] for it in items])
        labels = np.array([it["label"] for it in items])
        img_scores = image_scores(maps)
        m = class_metrics(labels, img_scores, maps, masks, cfg.evaluate.aupro_fpr)
        m["n_images"] = len(items)
        m["n_defective"] = int(labels.sum())
        threshold = verdicts.thresholds.get(name, float("nan"))
        m.update(verdict_metrics(labels, img_scores, threshold))
        m["threshold"], m["threshold_from"] = threshold, verdicts.sources.get(name, "")
        if router is not None:
            routes = router.route(descriptors(rows))
            m["routing_accuracy"] = float(np.mean([r.class_name == name for r in routes]))
            ood = np.array([r.ood for r in routes])
            m["ood_normal"] = float(ood[labels == 0].mean()) if (labels == 0).any() else float("nan")
            m["ood_defective"] = float(ood[labels == 1].mean()) if (labels == 1).any() else float("nan")
        all_scores[name] = {"labels": labels.tolist(), "scores": img_scores.tolist(), "threshold": threshold}
        per_class[name] = m
        figures[name] = _draw_class(name, items, maps, img_scores, labels, masks, m, threshold, figs, cfg)
        progress.update(len(items))
        log(f"evaluate: {name}: image AUROC {m['image_auroc']:.3f}, pixel AUROC {m['pixel_auroc']:.3f}, "
            f"AUPRO {m['aupro']:.3f}")
    progress.close()
    mean = {k: float(np.nanmean([per_class[c].get(k, np.nan) for c in per_class])) for k in METRICS + VERDICT}
    score_strips(all_scores, figs / "verdicts.png")
    result = {"run": run_dir.name, "protocol": "final model (no test-set selection)",
              "evaluate_key": eval_key, "train_key": train_key, "mean": mean, "per_class": per_class,
              "seconds": time.perf_counter() - t0, "figures": figures, "image_scores": all_scores}
    write_atomic(tmp / "metrics.json", json.dumps(result, indent=2, default=_nan))
    write_atomic(tmp / "metrics.csv", csv_table(per_class, mean))
    write_atomic(tmp / "report.md", report_markdown(result))
    swap_into_place(tmp, final)
    return result


def _nan(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else float(v)


def _draw_class(name: str, items: list[dict[str, Any]], maps: np.ndarray, scores: np.ndarray,
                labels: np.ndarray, masks: np.ndarray, m: dict[str, float], threshold: float,
                figs: Path, cfg: Config) -> list[str]:
    """Highest/lowest-scoring images, every misclassified one at the F1-max threshold, curves."""
    out = []
    order = np.argsort(scores)
    k = cfg.evaluate.figures_per_class
    chosen: dict[int, str] = {}
    for i in order[::-1][:k]:
        chosen[int(i)] = "highest"
    for i in order[:k]:
        chosen.setdefault(int(i), "lowest")
    th = m.get("f1_threshold", float("nan"))
    if np.isfinite(th):
        for i in np.nonzero((scores >= th) != labels.astype(bool))[0]:
            chosen[int(i)] = "misclassified"
    vmin, vmax = float(maps.min()), float(maps.max())
    for i, why in sorted(chosen.items()):
        it = items[i]
        stem = it["image_id"].replace("/", "_")
        path = figs / f"{stem}.png"
        verdict = "defective" if it["label"] else "normal"
        overlay(load_image(it["path"], cfg.features), maps[i], path,
                f"{it['image_id']} ({verdict}) score {scores[i]:.3f} [{why}]", masks[i], vmin, vmax)
        out.append(f"figures/{path.name}")
    curves(name, labels, scores, maps, masks, figs / f"curves_{name}.png", cfg.evaluate.aupro_fpr)
    score_histogram(name, labels, scores, threshold, figs / f"scores_{name}.png")
    return [f"figures/curves_{name}.png", f"figures/scores_{name}.png"] + out

"""Stage 3: score the cached test features with a trained head; metrics and pictures.

Test images are processed class by class (the cache is stored in class
order), so memory holds one class's maps at a time.
"""

from __future__ import annotations

import csv
import io
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
from core.files import remove_stale_temps, swap_into_place, temp_dir
from core.layout import RunFiles
from core.settings import Config
from stages.calibrate import load_router, read_calibration, verdicts_in_force
from stages.data import load_image
from stages.figures import curves, overlay, score_histogram, score_strips
from stages.heads import load_trained_head
from stages.maps import anomaly_maps, image_scores
from stages.metrics import class_metrics, verdict_metrics
from stages.routing import descriptors

METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro", "aupro_ader")
VERDICT = ("verdict_recall", "verdict_false_alarm", "verdict_precision", "verdict_f1", "routing_accuracy")


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
    size = cfg.features.crop or cfg.features.resize
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
    (tmp / "metrics.json").write_text(json.dumps(result, indent=2, default=_nan))
    (tmp / "metrics.csv").write_text(_csv(per_class, mean))
    (tmp / "report.md").write_text(report_markdown(result))
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


def _csv(per_class: dict[str, dict[str, float]], mean: dict[str, float]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["class", *METRICS])
    for c, m in per_class.items():
        w.writerow([c, *(f"{m[k]:.6f}" for k in METRICS)])
    w.writerow(["mean", *(f"{mean[k]:.6f}" for k in METRICS)])
    return buf.getvalue()


def metrics_table(per_class: dict[str, dict[str, float]], mean: dict[str, float]) -> str:
    """Markdown table, values in percent."""
    cols = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "image_f1_max", "pixel_ap")
    head = "| class | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    body = "".join(f"| {c} | " + " | ".join(_pct(m[k]) for k in cols) + " |\n" for c, m in per_class.items())
    return head + body + "| **mean** | " + " | ".join(f"**{_pct(mean[k])}**" for k in cols) + " |\n"


def verdict_table(per_class: dict[str, dict[str, Any]]) -> str:
    """Markdown table of the verdicts at the thresholds in force, per class."""
    head = ("| class | threshold | from | recall | false alarms | precision | F1 | F1-max (oracle) | routing |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for c, m in per_class.items():
        thr = m.get("threshold", float("nan"))
        rows.append(f"| {c} | {thr:.4g} | {m.get('threshold_from', '')} | {_pct(m.get('verdict_recall'))} | "
                    f"{_pct(m.get('verdict_false_alarm'))} | {_pct(m.get('verdict_precision'))} | "
                    f"{_pct(m.get('verdict_f1'))} | {_pct(m.get('image_f1_max'))} | "
                    f"{_pct(m.get('routing_accuracy'))} |\n")
    return head + "".join(rows)


def _pct(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def report_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Evaluation of run `{result['run']}`", "",
             f"Protocol: {result['protocol']}. Maps: bilinear to the crop size, Gaussian sigma as configured; "
             "image score = max of the map. AUPRO: exact MVTec definition, integrated to FPR 0.3 "
             "and divided by 0.3 (`aupro_ader` in metrics.csv is ADer's 200-threshold variant).", "",
             metrics_table(result["per_class"], result["mean"]), "",
             "## Verdicts at the run's own thresholds", "",
             "Each class has its own threshold, calibrated on training normals only (`calibration.json`) "
             "unless a user threshold is in force. Recall: defective test images flagged; false alarms: "
             "normal test images flagged; F1 beside the oracle F1-max (the best any threshold could do, "
             "chosen with test labels: a yardstick, never used). Routing: test images whose predicted "
             "class is their class.", "",
             verdict_table(result["per_class"]), "",
             "![verdicts](figures/verdicts.png)", "",
             "## Pictures", ""]
    for c, figs in result["figures"].items():
        lines.append(f"### {c}")
        lines.append("")
        lines += [f"![{Path(f).stem}]({f})" for f in figs[:2]]
        lines += [f"- [{Path(f).stem}]({f})" for f in figs[2:]]
        lines.append("")
    return "\n".join(lines)

"""Scoring new images with a trained run (the deploy path; no cache needed)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import CladError
from core.settings import Config
from stages.data import IMAGE_SUFFIXES, load_image
from stages.features import FeatureEncoder
from stages.figures import overlay
from stages.heads import load_head, score_rows
from stages.maps import anomaly_maps, image_scores


def expand_inputs(paths: list[str]) -> list[Path]:
    """Files as given, folders searched recursively for images."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise CladError(f"{p}: no such file or folder")
    if not out:
        raise CladError(f"no images found in {', '.join(paths)}")
    return out


def score_images(cfg: Config, run_dir: Path, paths: list[Path], out_dir: Path, device: torch.device,
                 log: Callable[[str], None], bar: Callable[[int], Any], batch: int = 16) -> list[dict[str, Any]]:
    """Score each image; write a heat map per image and results.csv/json. Unreadable images are skipped."""
    head, meta = load_head(run_dir / "checkpoints" / "final.pt", device)
    encoder = FeatureEncoder(cfg.features, device)
    threshold = float(meta.get("threshold", float("nan")))
    size = cfg.features.crop or cfg.features.resize
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    progress = bar(len(paths))
    for s in range(0, len(paths), batch):
        ok, images = [], []
        for p in paths[s:s + batch]:
            try:
                images.append(load_image(str(p), cfg.features))
                ok.append(p)
            except CladError as exc:
                log(f"score: skipped {exc}")
                results.append({"path": str(p), "score": None, "verdict": "unreadable", "heatmap": ""})
        if images:
            arr = np.stack(images)
            feats = torch.from_numpy(encoder(arr).astype(np.float32))
            scores = score_rows(head, feats.reshape(-1, feats.shape[-1]), device).reshape(len(ok), -1)
            maps = anomaly_maps(scores, size, cfg.evaluate.sigma)
            for p, img, amap, sc in zip(ok, arr, maps, image_scores(maps), strict=True):
                verdict = "anomalous" if np.isfinite(threshold) and sc > threshold else "normal"
                png = out_dir / f"{len(results):05d}_{p.stem}.png"
                overlay(img, amap, png, f"{p.name}: score {sc:.3f} (threshold {threshold:.3f}) -> {verdict}",
                        vmin=min(float(amap.min()), threshold), vmax=max(float(amap.max()), threshold))
                results.append({"path": str(p), "score": float(sc), "verdict": verdict, "heatmap": str(png)})
        progress.update(len(paths[s:s + batch]))
    progress.close()
    _write_table(results, out_dir, threshold)
    return results


def _write_table(results: list[dict[str, Any]], out_dir: Path, threshold: float) -> None:
    tmp = out_dir / f".results.tmp-{os.getpid()}.csv"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "score", "verdict", "heatmap"])
        w.writeheader()
        w.writerows(results)
    os.replace(tmp, out_dir / "results.csv")
    tmpj = out_dir / f".results.tmp-{os.getpid()}.json"
    tmpj.write_text(json.dumps({"threshold": threshold, "images": results}, indent=2))
    os.replace(tmpj, out_dir / "results.json")

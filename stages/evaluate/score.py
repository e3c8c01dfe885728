"""Scoring new images with a trained run (the deploy path; no cache needed).

Each image gets a class (``--class``; else predicted by ``stages.train.routing``,
with the nearest enclosing folder named like a trained class as a hint that
decides when the prediction is unsure or out of distribution), a raw score, a
normalised score (its class threshold at ``calibrate.normalized_at``) and a
verdict against its class's threshold. An image that fits no trained class
is reported as out of distribution and not judged.

A folder name is only a hint: files get misfiled, and a folder named like a
class may hold anything. When it disagrees with a confident in-distribution
prediction (confidence >= ``CONFIDENT``), the image is judged as the predicted
class, a warning names the file and both classes, and results.csv records
the folder's class (``folder_class``) and ``class_from`` says what decided.
``--class`` always wins.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import CladError
from core.files import remove_stale_temps, swap_into_place, temp_dir, write_atomic
from core.layout import RunFiles
from core.settings import Config
from stages.evaluate.figures import overlay
from stages.extract.data import IMAGE_SUFFIXES, load_image
from stages.extract.features import FeatureEncoder
from stages.heads import load_trained_head
from stages.maps import anomaly_maps, image_scores
from stages.train.calibrate import load_router, read_calibration, verdicts_in_force
from stages.train.routing import OOD, descriptors

FIELDS = ["path", "class", "class_from", "confidence", "predicted_class", "in_distribution", "folder_class", "score",
          "normalized", "threshold", "threshold_from", "verdict", "heatmap"]
# Routing confidence (1 - d_best / d_other_class) above which a prediction overrules a folder name. On the
# built-in set, in-distribution images route right at 0.80 to 1.0; defect images that fit no class at ~0.3.
CONFIDENT = 0.5


def expand_inputs(paths: list[str], skip: Path | None = None) -> tuple[list[Path], int]:
    """Files as given, folders searched recursively for images; returns them and
    how many images were passed over inside folders because they lie in the
    output folder ``skip`` (a second run would score its own heat maps) or in
    hidden folders (temporaries of a running or killed score)."""
    out: list[Path] = []
    skipped = 0
    own = skip.resolve() if skip is not None else None
    for p in map(Path, paths):
        if p.is_dir():
            for q in sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and not q.is_dir()):
                rel = q.relative_to(p).parts
                if any(part.startswith(".") for part in rel) or (own is not None and own in q.resolve().parents):
                    skipped += 1
                else:
                    out.append(q)
        elif p.is_file():
            out.append(p)
        else:
            raise CladError(f"{p}: no such file or folder" + (" (a broken symbolic link)" if p.is_symlink() else ""))
    if not out:
        raise CladError(f"no images found in {', '.join(paths)}"
                        + (f" ({skipped} in the output folder or hidden folders were skipped)" if skipped else ""))
    return out, skipped


def check_out_dir(out_dir: Path) -> None:
    """``--out`` is a folder that ``clad score`` owns and replaces whole: refuse a
    regular file, and a folder holding anything but an earlier score's output."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CladError(f"--out {out_dir}: is a file, not a folder; name a new folder (it is created) "
                        "or move the file away")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "results.csv").is_file():
        raise CladError(f"--out {out_dir}: folder holds files that are not an earlier 'clad score' output "
                        "(no results.csv), and score replaces its output folder whole; name a new or empty folder")


def folder_class(path: Path, classes: list[str]) -> str:
    """The nearest enclosing folder of ``path`` named like a trained class ("" if none)."""
    for parent in path.parents:
        if parent.name in classes:
            return parent.name
    return ""


def score_images(cfg: Config, files: RunFiles, paths: list[Path], out_dir: Path, device: torch.device,
                 log: Callable[[str], None], bar: Callable[[int], Any], class_name: str = "",
                 batch: int = 16) -> list[dict[str, Any]]:
    """Score each image; write a heat map per image and results.csv/json. Unreadable images are skipped.

    Everything is written into a hidden sibling ``.OUT.tmp-PID`` and swapped
    into place at the end, so ``out_dir`` always holds one whole scoring (a
    kill leaves the previous one; its temporaries are removed by the next run)."""
    check_out_dir(out_dir)
    head, meta = load_trained_head(files.final, device)
    classes = list(meta["class_names"])
    if class_name and class_name not in classes:
        raise CladError(f"--class {class_name!r}: not a class of run {files.name!r} ({', '.join(classes)})")
    cal = read_calibration(files)
    verdicts = verdicts_in_force(cal, files, cfg.calibrate)
    router = load_router(files)
    encoder = FeatureEncoder(cfg.features, device)
    for gone in remove_stale_temps(out_dir.parent, recursive=False, of=out_dir.name):
        log(f"score: removed {gone}, left by an interrupted process")
    work_dir = temp_dir(out_dir)
    try:
        results = _score_into(cfg, paths, (work_dir, out_dir), head, encoder, router, verdicts, classes,
                              class_name, log, bar(len(paths)), batch)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)  # out_dir keeps the previous scoring, whole
        raise
    swap_into_place(work_dir, out_dir)
    return results


def _score_into(cfg: Config, paths: list[Path], dirs: tuple[Path, Path], head: Any, encoder: Any, router: Any,
                verdicts: Any, classes: list[str], class_name: str, log: Callable[[str], None], progress: Any,
                batch: int) -> list[dict[str, Any]]:
    """Score batch by batch, writing heat maps and the tables into ``dirs[0]``."""
    size = cfg.features.output_size
    results: list[dict[str, Any]] = []
    for s in range(0, len(paths), batch):
        ok, images = [], []
        for p in paths[s:s + batch]:
            try:
                images.append(load_image(str(p), cfg.features))
                ok.append(p)
            except CladError as exc:
                log(f"score: skipped {exc}")
                results.append({"path": str(p), "class": "", "verdict": "unreadable"})
        if images:
            arr = np.stack(images)
            feats = encoder(arr).astype(np.float32)
            scores = head.score_maps(torch.from_numpy(feats))
            maps = anomaly_maps(scores, size, cfg.evaluate.sigma)
            routes = router.route(descriptors(feats)) if router is not None else [None] * len(ok)
            for p, img, amap, sc, rt in zip(ok, arr, maps, image_scores(maps), routes, strict=True):
                results.append(_judge(p, img, amap, float(sc), rt, class_name, classes, verdicts, dirs,
                                      len(results), log))
        progress.update(len(paths[s:s + batch]))
    progress.close()
    _write_table(results, dirs[0], verdicts)
    return results


def _judge(p: Path, img: np.ndarray, amap: np.ndarray, score: float, route: Any, class_name: str,
           classes: list[str], verdicts: Any, dirs: tuple[Path, Path], index: int,
           log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Class, normalised score and verdict of one image, and its heat map."""
    predicted = route.class_name if route is not None else classes[0]
    confidence = route.confidence if route is not None else float("nan")
    fits = route is None or not route.ood
    folder = folder_class(p, classes)
    if class_name:
        cls, how = class_name, "user (--class)"
    elif folder and route is not None and fits and confidence >= CONFIDENT and folder != predicted:
        cls, how = predicted, f"predicted (folder says {folder})"
        log(f"score: {p}: the folder name says {folder!r} but the run predicts {predicted!r} with confidence "
            f"{confidence:.2f}; judged as {predicted!r} (add --class {folder} to judge it as {folder!r})")
    elif folder:
        cls, how = folder, "folder"
    else:
        cls, how = predicted, "predicted"
    norm, verdict = verdicts.judge(cls, score)
    if how == "predicted" and not fits:
        verdict = OOD  # fits no trained class: rejected, never judged "normal" against a wrong class
    thr = verdicts.thresholds.get(cls, float("nan"))
    name = f"{index:05d}_{p.stem}.png"
    png = dirs[1] / name  # where it will be: the table names the final place
    title = (f"{p.name} [{cls}]: score {score:.3f} (threshold {thr:.3f}, normalised {norm:.2f}) -> {verdict}"
             if verdict != OOD else f"{p.name}: score {score:.3f}; fits no trained class (nearest {cls}) -> {OOD}")
    lo, hi = float(amap.min()), float(amap.max())
    overlay(img, amap, dirs[0] / name, title, vmin=min(lo, thr) if np.isfinite(thr) else lo,
            vmax=max(hi, thr) if np.isfinite(thr) else hi)
    return {"path": str(p), "class": cls, "class_from": how, "confidence": round(confidence, 4),
            "predicted_class": predicted, "in_distribution": "yes" if fits else "no", "folder_class": folder,
            "score": score, "normalized": round(norm, 4), "threshold": thr,
            "threshold_from": verdicts.sources.get(cls, ""), "verdict": verdict, "heatmap": str(png)}


def _write_table(results: list[dict[str, Any]], out_dir: Path, verdicts: Any) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, restval="")
    w.writeheader()
    w.writerows(results)
    write_atomic(out_dir / "results.csv", buf.getvalue())
    write_atomic(out_dir / "results.json", json.dumps(
        {"thresholds": verdicts.thresholds, "threshold_from": verdicts.sources,
         "normalized_at": verdicts.normalized_at, "images": results}, indent=2, default=str))

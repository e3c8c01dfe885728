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
from dataclasses import dataclass
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


@dataclass
class Scorer:
    """What scoring an image needs from a trained run: the head, the feature encoder, the
    router and the verdicts in force (loaded once per process: here, or once per Dask worker)."""

    head: Any
    encoder: Any
    router: Any
    verdicts: Any
    classes: list[str]

    @classmethod
    def load(cls, cfg: Config, files: RunFiles, device: torch.device) -> Scorer:
        head, meta = load_trained_head(files.final, device)
        verdicts = verdicts_in_force(read_calibration(files), files, cfg.calibrate)
        return cls(head, FeatureEncoder(cfg.features, device), load_router(files), verdicts,
                   list(meta["class_names"]))


def score_images(cfg: Config, files: RunFiles, paths: list[Path], out_dir: Path, device: torch.device,
                 log: Callable[[str], None], bar: Callable[[int], Any], class_name: str = "",
                 batch: int = 16, scheduler: str = "") -> list[dict[str, Any]]:
    """Score each image; write a heat map per image and results.csv/json. Unreadable images are skipped.

    Everything is written into a hidden sibling ``.OUT.tmp-PID`` and swapped
    into place at the end, so ``out_dir`` always holds one whole scoring (a
    kill leaves the previous one; its temporaries are removed by the next run).
    With ``scheduler`` (``local`` or a Dask address) the images go in chunks of
    ``CHUNK`` to the cluster's workers (each loads the run once; the output folder
    must be on a file system they share); results, heat maps and their names are
    those of an in-process run."""
    check_out_dir(out_dir)
    meta = load_trained_head(files.final, torch.device("cpu"))[1]
    classes = list(meta["class_names"])
    if class_name and class_name not in classes:
        raise CladError(f"--class {class_name!r}: not a class of run {files.name!r} ({', '.join(classes)})")
    for gone in remove_stale_temps(out_dir.parent, recursive=False, of=out_dir.name):
        log(f"score: removed {gone}, left by an interrupted process")
    work_dir = temp_dir(out_dir)
    progress = bar(len(paths))
    try:
        if scheduler:
            results = _score_on_cluster(cfg, files, paths, (work_dir, out_dir), class_name, log, progress, batch,
                                        device, scheduler)
        else:
            results = _score_into(cfg, paths, (work_dir, out_dir), Scorer.load(cfg, files, device), class_name,
                                  log, progress, batch)
        progress.close()
        _write_table(results, work_dir, verdicts_in_force(read_calibration(files), files, cfg.calibrate))
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)  # out_dir keeps the previous scoring, whole
        raise
    swap_into_place(work_dir, out_dir)
    return results


CHUNK = 64  # images per Dask task: a multiple of the batch, so that batches (and heat-map names) match in-process
_WORKER_SCORER: dict[tuple[str, ...], Scorer] = {}  # per worker process: the run it has loaded


def score_chunk(cfg: Config, run_root: str, paths: list[str], dirs: tuple[str, str], class_name: str,
                first_index: int, device: str, batch: int) -> tuple[list[dict[str, Any]], list[str]]:
    """One Dask task: score ``paths`` (the images from ``first_index`` on) into ``dirs[0]``;
    returns their results and the lines an in-process run would have logged."""
    from core.devices import resolve_device

    files = RunFiles(Path(run_root))
    stamp = tuple(str(p.stat().st_mtime_ns) if p.exists() else "" for p in (files.final, files.calibration,
                                                                             files.user_thresholds))
    key = (run_root, device, *stamp)  # a run re-trained or re-calibrated since is loaded again
    if key not in _WORKER_SCORER:
        torch.set_num_threads(1)
        _WORKER_SCORER.clear()
        _WORKER_SCORER[key] = Scorer.load(cfg, files, resolve_device(device))
    lines: list[str] = []
    results = _score_into(cfg, [Path(p) for p in paths], (Path(dirs[0]), Path(dirs[1])), _WORKER_SCORER[key],
                          class_name, lines.append, None, batch, first_index)
    return results, lines


def _score_on_cluster(cfg: Config, files: RunFiles, paths: list[Path], dirs: tuple[Path, Path], class_name: str,
                      log: Callable[[str], None], progress: Any, batch: int, device: torch.device,
                      scheduler: str) -> list[dict[str, Any]]:
    """Chunks of ``CHUNK`` images as Dask tasks; results gathered in image order."""
    from dask.distributed import as_completed

    from core.cluster import dask_client

    chunk = max(batch, CHUNK // batch * batch)
    starts = list(range(0, len(paths), chunk))
    parts: dict[int, tuple[list[dict[str, Any]], list[str]]] = {}
    with dask_client(scheduler) as client:
        log(f"score: {len(paths)} images in {len(starts)} tasks of {chunk} on Dask scheduler {scheduler} "
            f"({len(client.scheduler_info()['workers'])} workers)")
        futures = {client.submit(score_chunk, cfg, str(files.root), [str(p) for p in paths[s:s + chunk]],
                                 (str(dirs[0]), str(dirs[1])), class_name, s, device.type, batch, pure=False): s
                   for s in starts}
        for fut in as_completed(futures):
            s = futures[fut]
            parts[s] = fut.result()
            progress.update(len(paths[s:s + chunk]))
    results: list[dict[str, Any]] = []
    for s in starts:
        results += parts[s][0]
        for line in parts[s][1]:
            log(line)
    return results


def _score_into(cfg: Config, paths: list[Path], dirs: tuple[Path, Path], scorer: Scorer, class_name: str,
                log: Callable[[str], None], progress: Any, batch: int, first_index: int = 0) -> list[dict[str, Any]]:
    """Score batch by batch, writing heat maps into ``dirs[0]`` (named from ``first_index`` on)."""
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
            feats = scorer.encoder(arr).astype(np.float32)
            scores = scorer.head.score_maps(torch.from_numpy(feats))
            maps = anomaly_maps(scores, size, cfg.evaluate.sigma)
            routes = scorer.router.route(descriptors(feats)) if scorer.router is not None else [None] * len(ok)
            for p, img, amap, sc, rt in zip(ok, arr, maps, image_scores(maps), routes, strict=True):
                results.append(_judge(p, img, amap, float(sc), rt, class_name, scorer.classes, scorer.verdicts,
                                      dirs, first_index + len(results), log))
        if progress is not None:
            progress.update(len(paths[s:s + batch]))
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

"""``clad-run BUNDLE IMAGES_OR_FOLDERS... [--class NAME] [--out DIR] [--threshold CLASS=VALUE]... [--verify]``

Scores images with a bundle written by ``clad export``: the same results.csv
columns and verdict rules as ``clad score``, and a heat map per image. Bad
input gets one line on stderr naming the file or option and the fix, and
exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from clad_run.bundle import Bundle, BundleError
from clad_run.heatmap import save_overlay
from clad_run.outdir import swap_into_place, temp_dir
from clad_run.preprocess import IMAGE_SUFFIXES, ImageError, load_image
from clad_run.scoring import OOD, Scorer, verdicts

FIELDS = ["path", "class", "class_from", "confidence", "predicted_class", "in_distribution", "folder_class", "score",
          "normalized", "threshold", "threshold_from", "verdict", "heatmap"]


def say(msg: str) -> None:
    print(f"clad-run: {msg}", file=sys.stderr, flush=True)


def parse_thresholds(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            v = float(value)
        except ValueError:
            v = math.nan
        if not sep or not name or not math.isfinite(v):
            raise BundleError(f"--threshold {item!r}: write CLASS=VALUE with a finite raw score, e.g. "
                              "--threshold bottle=1.5")
        out[name] = v
    return out


def expand_inputs(paths: list[str], skip: Path) -> list[Path]:
    out: list[Path] = []
    own = skip.resolve()
    for p in map(Path, paths):
        if p.is_dir():
            for q in sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()):
                if any(part.startswith(".") for part in q.relative_to(p).parts) or own in q.resolve().parents:
                    continue
                out.append(q)
        elif p.is_file():
            out.append(p)
        else:
            raise BundleError(f"{p}: no such file or folder")
    if not out:
        raise BundleError(f"no images found in {', '.join(paths)}")
    return out


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out}: is a file, not a folder; name a new folder (it is created)")
    if out.is_dir() and any(out.iterdir()) and not (out / "results.csv").is_file():
        raise BundleError(f"--out {out}: folder holds files that are not an earlier clad-run output (no "
                          "results.csv); name a new or empty folder")


def folder_class(path: Path, classes: list[str]) -> str:
    for parent in path.parents:
        if parent.name in classes:
            return parent.name
    return ""


def judge(p: Path, img: np.ndarray, amap: np.ndarray, score: float, route: Any, class_name: str,
          classes: list[str], v: Any, out: Path, index: int, confident: float, work: Path | None = None
          ) -> dict[str, Any]:
    """Class, normalised score, verdict and heat map of one image (``stages.evaluate.score._judge``'s
    rules); the heat map is written into ``work`` (default ``out``) and named by its place in ``out``."""
    predicted = route.class_name if route is not None else classes[0]
    confidence = route.confidence if route is not None else float("nan")
    fits = route is None or not route.ood
    folder = folder_class(p, classes)
    if class_name:
        cls, how = class_name, "user (--class)"
    elif folder and route is not None and fits and confidence >= confident and folder != predicted:
        cls, how = predicted, f"predicted (folder says {folder})"
        say(f"{p}: the folder name says {folder!r} but the bundle predicts {predicted!r} with confidence "
            f"{confidence:.2f}; judged as {predicted!r} (add --class {folder} to judge it as {folder!r})")
    elif folder:
        cls, how = folder, "folder"
    else:
        cls, how = predicted, "predicted"
    norm, verdict = v.judge(cls, score)
    if how == "predicted" and not fits:
        verdict = OOD
    thr = v.thresholds.get(cls, float("nan"))
    png = out / f"{index:05d}_{p.stem}.png"
    png_written = (work or out) / png.name
    title = (f"{p.name} [{cls}]: score {score:.3f} (threshold {thr:.3f}, normalised {norm:.2f}) -> {verdict}"
             if verdict != OOD else f"{p.name}: score {score:.3f}; fits no trained class (nearest {cls}) -> {OOD}")
    lo, hi = float(amap.min()), float(amap.max())
    finite = math.isfinite(thr)
    save_overlay(img, amap, png_written, title, min(lo, thr) if finite else lo, max(hi, thr) if finite else hi)
    return {"path": str(p), "class": cls, "class_from": how, "confidence": round(confidence, 4),
            "predicted_class": predicted, "in_distribution": "yes" if fits else "no", "folder_class": folder,
            "score": score, "normalized": round(norm, 4), "threshold": thr,
            "threshold_from": v.sources.get(cls, ""), "verdict": verdict, "heatmap": str(png)}


def score(bundle: Bundle, scorer: Scorer, paths: list[Path], out: Path, class_name: str,
          overrides: dict[str, float], batch: int) -> list[dict[str, Any]]:
    """Score ``paths`` into ``out``: everything is written into a hidden sibling
    folder and swapped in at the end (``clad_run.outdir``), so ``out`` holds one
    whole scoring, the old one or the new one, whatever happens in between."""
    m = bundle.manifest
    classes = list(m["classes"])
    if class_name and class_name not in classes:
        raise BundleError(f"--class {class_name!r}: not a class of this bundle ({', '.join(classes)})")
    v = verdicts(bundle, overrides)
    pre = m["preprocessing"]
    confident = float((m.get("routing") or {}).get("confident", 0.5))
    work = temp_dir(out)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for s in range(0, len(paths), batch):
        ok, images = [], []
        for p in paths[s:s + batch]:
            try:
                images.append(load_image(str(p), int(pre["resize"]), int(pre["crop"]), pre["interpolation"]))
                ok.append(p)
            except ImageError as exc:
                say(f"skipped {exc}")
                results.append({"path": str(p), "class": "", "verdict": "unreadable"})
        if images:
            arr = np.stack(images)
            maps, scores, routes = scorer(arr)
            for p, img, amap, sc, rt in zip(ok, arr, maps, scores, routes, strict=True):
                results.append(judge(p, img, amap, float(sc), rt, class_name, classes, v, out, len(results),
                                     confident, work))
        done = min(s + batch, len(paths))
        print(f"\rclad-run: {done}/{len(paths)} images ({done / (time.perf_counter() - t0):.1f} img/s)",
              end="" if done < len(paths) else "\n", file=sys.stderr, flush=True)
    with open(work / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, restval="")
        w.writeheader()
        w.writerows(results)
    (work / "results.json").write_text(json.dumps(
        {"thresholds": v.thresholds, "threshold_from": v.sources, "normalized_at": v.normalized_at,
         "images": results}, indent=2, default=str))
    swap_into_place(work, out)
    return results


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clad-run", description="Score images with a bundle written by "
                                 "'clad export' (numpy, onnxruntime and pillow only).")
    ap.add_argument("bundle", help="bundle folder (clad export --out DIR)")
    ap.add_argument("paths", nargs="*", help="image files or folders (searched recursively)")
    ap.add_argument("--class", dest="class_name", default="", help="class of every image (default: predicted)")
    ap.add_argument("--out", default="clad-run-scores", help="output folder (default: ./clad-run-scores)")
    ap.add_argument("--threshold", action="append", default=[], metavar="CLASS=VALUE",
                    help="override one class's raw-score threshold (repeatable)")
    ap.add_argument("--batch", type=int, default=16, help="images per batch (default 16)")
    ap.add_argument("--verify", action="store_true",
                    help="score the bundle's golden images and compare with the torch path measured at export")
    return ap


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.paths and not args.verify:
        raise BundleError("no images given; name image files or folders after the bundle (or use --verify)")
    overrides = parse_thresholds(args.threshold)
    bundle = Bundle(args.bundle)
    verdicts(bundle, overrides)  # a class name the bundle does not know is refused before anything is loaded
    if args.class_name and args.class_name not in bundle.manifest["classes"]:
        raise BundleError(f"--class {args.class_name!r}: not a class of this bundle "
                          f"({', '.join(bundle.manifest['classes'])})")
    t0 = time.perf_counter()
    scorer = Scorer(bundle)
    say(f"bundle {args.bundle}: run {bundle.manifest['run']!r}, head {bundle.manifest['head_name']}, "
        f"{len(bundle.manifest['classes'])} classes; loaded in {time.perf_counter() - t0:.2f} s")
    status = 0
    if args.verify:
        from clad_run.verify import golden_parity

        par = golden_parity(args.bundle, scorer)
        at_export = bundle.manifest.get("parity", {})
        say(f"verify: {par['images']} golden images: max score difference {par['max_score_diff']:.3g} (relative "
            f"{par['max_score_rel_diff']:.3g}; at export {at_export.get('max_score_rel_diff', float('nan')):.3g}), "
            f"max map difference {par['max_map_diff']:.3g}, verdicts agree {par['verdicts_agree']}/{par['images']}: "
            + ("OK" if par["ok"] else "FAILED"))
        status = 0 if par["ok"] else 1
    if args.paths:
        out = Path(args.out)
        check_out_dir(out)
        paths = expand_inputs(args.paths, out)
        results = score(bundle, scorer, paths, out, args.class_name, overrides, max(1, args.batch))
        counts = {k: sum(r["verdict"] == k for r in results) for k in ("anomalous", "normal", OOD, "unreadable")}
        say(f"{len(results)} images: " + ", ".join(f"{n} {k}" for k, n in counts.items()) +
            f"; table {out / 'results.csv'}, heat maps in {out}")
        if counts["unreadable"] == len(results):
            raise BundleError(f"none of the {len(results)} images could be read (see the lines above)")
    return status


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except (BundleError, ImageError) as exc:
        print(f"clad-run: error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()

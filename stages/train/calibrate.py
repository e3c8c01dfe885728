"""Per-class verdict thresholds from training normals only (never test labels).

For each class: the image scores (max of the anomaly map, exactly as
evaluation and scoring compute them) of its normal training images, scored
by a model that did not see them where the head can arrange that
(cross-fitting), give the class threshold as a high quantile. A normalised
score puts every class's threshold at one fixed value, so scores of
different products share one dashboard. The calibration records the settings
it used (run key, sigma, map size, quantile) and is stale when they change.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from core.errors import CladError
from core.files import read_json, save_torch_atomic, write_atomic
from core.layout import RunFiles
from core.schema import keyed
from core.settings import CalibrateConfig, Config, settings_hash
from stages.maps import anomaly_maps, image_scores
from stages.train.context import TrainContext
from stages.train.labels import image_means
from stages.train.routing import Router

if TYPE_CHECKING:  # the heads are trained above this module; it only calls Head.calibration_scores
    from stages.heads.base import Head

CALIBRATE_CODE_VERSION = 1
MIN_CLASS_UNSEEN = 5  # unseen images a class needs before its own seen-to-unseen fit is trusted (seen_fit)


# -- the mathematics (pure) -------------------------------------------------------
def class_threshold(scores: np.ndarray, quantile: float, min_images: int) -> dict[str, float]:
    """Threshold and evidence for one class from its normal image scores.

    ``quantile`` of the scores (linear interpolation) when there are at least
    ``min_images``; with fewer, a quantile is not estimable, so the threshold
    is the largest score plus one standard deviation (wider: fewer false
    alarms on a class we know little about). ``scale`` (the scores' standard
    deviation, floored) sets the width of the normalised score.
    """
    s = np.asarray(scores, np.float64)
    if not len(s):
        return {"threshold": math.nan, "n_images": 0, "rule": "none", "mean": math.nan, "std": math.nan,
                "min": math.nan, "max": math.nan, "scale": math.nan}
    std = float(s.std())
    if len(s) >= min_images:
        thr, rule = float(np.quantile(s, quantile)), f"quantile {quantile:g}"
    else:
        thr, rule = float(s.max() + std), f"max + std (fewer than {min_images} images)"
    scale = max(std, 1e-3 * max(abs(thr), 1e-6))
    return {"threshold": thr, "n_images": int(len(s)), "rule": rule, "mean": float(s.mean()), "std": std,
            "min": float(s.min()), "max": float(s.max()), "scale": scale}


def seen_fit(seen: dict[int, np.ndarray], unseen: dict[int, np.ndarray], min_unseen: int = MIN_CLASS_UNSEEN,
             spread: bool = True, own_floor: bool = False) -> dict[int, tuple[float, float]]:
    """How to map each class's scores of images the model trained on onto
    the scores unseen normals get: ``{class: (shift, stretch)}``, applied by
    ``fitted_seen`` as ``median + shift + (s - median) x stretch``.

    A learned head scores its own training images lower, and tighter, than
    new normal ones (transistor, CLAD: held-out images 3.0 standard
    deviations of the seen scores above their median, and spread 1.7 times
    as wide; every class of the seven-class model 1.6-2.0 times), so a
    quantile of training scores puts the threshold inside the unseen
    normals' spread and flags good parts. Each unseen image is placed in
    its class's seen scores: ``z = (s - median(seen_c)) / std(seen_c)``. A
    class with at least ``min_unseen`` unseen images uses its own z; one with
    fewer, every class's unseen z pooled (one held-out image says little
    about its class alone). shift = max(median z, 0) x std(seen_c); stretch
    = max(sample std of z, 1) when ``spread`` (a location-scale fit), else 1
    (location only). Neither ever tightens or lowers the seen scores: a
    head that scores unseen normals like seen ones needs no correction.
    ``own_floor``: a class on the pooled fit is shifted at least to the median
    of its own unseen z. Why: the pooled z is that of the classes with many
    held-out images, and a scorer can open a far wider gap in a small class
    (the seven-class CLAD model scoring capsule by s + d: its one held-out
    image 13.7 seen standard deviations above the seen median, the pool's
    median 1.0; the test's good capsules scored where that image did, and the
    pooled fit flagged all of them). One image cannot give the spread, but a
    good part that far above the fit is one the fit would flag.
    ``seen``/``unseen``: ``{class: [image scores]}``; a class with fewer than two
    seen scores or no spread among them gets (0, 1).
    """
    z: dict[int, np.ndarray] = {}
    for c, s in seen.items():
        s = np.asarray(s, np.float64)
        u = np.asarray(unseen.get(c, []), np.float64)
        if len(s) >= 2 and s.std() > 0 and len(u):
            z[c] = (u - np.median(s)) / s.std()
    pooled = np.concatenate(list(z.values())) if z else np.zeros(0)
    out = {}
    for c, s in seen.items():
        s = np.asarray(s, np.float64)
        own = c in z and len(z[c]) >= min_unseen
        zc = z[c] if own else pooled
        if len(s) < 2 or not s.std() > 0 or not len(zc):
            out[c] = (0.0, 1.0)
            continue
        stretch = max(float(np.std(zc, ddof=1)), 1.0) if spread and len(zc) >= 2 else 1.0
        floor = float(np.median(z[c])) if own_floor and not own and c in z else 0.0
        out[c] = (max(float(np.median(zc)), floor, 0.0) * float(s.std()), stretch)
    return out


def fitted_seen(seen: np.ndarray, shift: float, stretch: float) -> np.ndarray:
    """Seen scores moved onto the unseen ones (``seen_fit``): same length."""
    seen = np.asarray(seen, np.float64)
    if not len(seen):
        return seen
    m = np.median(seen)
    return m + shift + (seen - m) * stretch


def normalized_score(score: float | np.ndarray, threshold: float, scale: float, at: float = 0.5
                     ) -> float | np.ndarray:
    """Map a raw score to (0, 1) with the class threshold at exactly ``at``:
    ``sigmoid((s - threshold) / scale + logit(at))``. One class-normal spread
    above the threshold is 0.73 (for at = 0.5)."""
    z = (np.asarray(score, np.float64) - threshold) / scale + math.log(at / (1 - at))
    out = 1.0 / (1.0 + np.exp(-z))
    return float(out) if np.ndim(out) == 0 else out


# -- thresholds in force (calibrated, or set by the user) ---------------------------------
@dataclass(frozen=True)
class Verdicts:
    """The thresholds in force for a run: per class value, scale and source."""

    thresholds: dict[str, float]
    scales: dict[str, float]
    sources: dict[str, str]  # calibrated | user (FILE)
    normalized_at: float

    def judge(self, class_name: str, score: float) -> tuple[float, str]:
        """(normalised score, verdict) of an image of ``class_name``."""
        if class_name not in self.thresholds or not math.isfinite(self.thresholds[class_name]):
            return math.nan, "unjudged"
        thr = self.thresholds[class_name]
        norm = normalized_score(score, thr, self.scales[class_name], self.normalized_at)
        return float(norm), "anomalous" if score > thr else "normal"


def read_user_thresholds(path: Path) -> dict[str, float]:
    """``[thresholds]`` table of a TOML file: ``class = raw threshold``."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CladError(f"{path}: unreadable threshold file ({exc}); write '[thresholds]' then 'CLASS = VALUE' "
                        "lines") from None
    table = raw.get("thresholds", raw)
    if not isinstance(table, dict):
        raise CladError(f"{path}: write '[thresholds]' then 'CLASS = VALUE' lines")
    out = {}
    for k, v in table.items():
        # TOML's true is not 1.0, nan and inf judge nothing: a wrong verdict for every image would be silent
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise CladError(f"{path}: threshold {k} = {v!r} is not a finite number; write a raw score, "
                            f"e.g. '{k} = 1.5' under [thresholds] (or delete the line to use the calibrated one)")
        out[str(k)] = float(v)
    return out


def verdicts_in_force(cal: dict[str, Any], files: RunFiles, cfg: CalibrateConfig) -> Verdicts:
    """The calibrated thresholds, with the user's overrides (config file, then
    the run's ``thresholds.toml``) winning class by class."""
    classes = cal["classes"]
    thr = {c: v["threshold"] for c, v in classes.items()}
    scales = {c: v["scale"] for c, v in classes.items()}
    sources = dict.fromkeys(classes, "calibrated")
    for path in [Path(cfg.overrides)] * bool(cfg.overrides) + [files.user_thresholds]:
        if not path.is_file():
            if path != files.user_thresholds:
                raise CladError(f"calibrate.overrides={cfg.overrides!r}: no such file; fix config.toml")
            continue
        for c, v in read_user_thresholds(path).items():
            if c not in thr:
                raise CladError(f"{path}: class {c!r} is not a class of this run ({', '.join(thr)})")
            lowest = classes[c].get("min")
            if v < 0 and not (lowest is not None and math.isfinite(lowest) and lowest < 0):
                raise CladError(f"{path}: threshold {c} = {v!r} is negative, but this run's scores of {c} are "
                                f"never negative (lowest calibration score {lowest}): every image would be "
                                "anomalous; write a threshold of 0 or more")
            thr[c], sources[c] = v, f"user ({path.name})"
            if not math.isfinite(scales.get(c, math.nan)):
                scales[c] = max(abs(v) * 0.05, 1e-6)
    return Verdicts(thr, scales, sources, cfg.normalized_at)


# -- the stage ----------------------------------------------------------------------
def calibration_key(cfg: Config, train_key: str) -> str:
    """What a calibration depends on: the trained run, map settings, calibration settings."""
    from stages.heads.registry import head_class  # lazily: the heads are built above this module

    cal = keyed(cfg.calibrate)  # a setting at its added value is left out (core.schema)
    cal.pop("overrides")  # read when verdicts are made, never baked in
    if head_class(cfg.train.head).cross_fits and cfg.calibrate.folds >= 2:
        cal.pop("seen_shift", None)  # every image unseen: the shift cannot apply, so it moves no key
        cal.pop("seen_own_floor", None)
    size = cfg.features.output_size
    return settings_hash({"code": CALIBRATE_CODE_VERSION, "train": train_key, "calibrate": cal,
                          "maps": {"sigma": cfg.evaluate.sigma, "size": size}})


def image_scores_of(patch_scores: dict[int, np.ndarray], size: int, sigma: float, batch: int = 64
                    ) -> dict[int, float]:
    """``{image: [H*W] patch scores}`` -> ``{image: image score}`` (max of the smoothed map)."""
    ids = sorted(patch_scores)
    out: dict[int, float] = {}
    for s in range(0, len(ids), batch):
        chunk = ids[s:s + batch]
        maps = anomaly_maps(torch.from_numpy(np.stack([patch_scores[i] for i in chunk])), size, sigma)
        out.update(zip(chunk, map(float, image_scores(maps)), strict=True))
    return out


def calibrate_run(cfg: Config, head: Head, ctx: TrainContext, train_key: str) -> dict[str, Any]:
    """Per-class thresholds and the router of a trained run; writes
    ``calibration.json`` and ``routing.pt`` and returns the calibration."""
    c = cfg.calibrate
    size = cfg.features.output_size
    patch, unseen = head.calibration_scores(ctx, c.folds)
    scores = image_scores_of(patch, size, cfg.evaluate.sigma)
    names = ctx.cache.class_names
    of_class = {k: [i for i in scores if ctx.cache.image_class[i] == k] for k in range(len(names))}
    seen = {k: np.array([scores[i] for i in ids if i not in unseen]) for k, ids in of_class.items()}
    fresh = {k: np.array([scores[i] for i in ids if i in unseen]) for k, ids in of_class.items()}
    fit = (seen_fit(seen, fresh, spread=c.seen_shift == "gap_spread", own_floor=c.seen_own_floor)
           if c.seen_shift != "none"
           else dict.fromkeys(seen, (0.0, 1.0)))
    per_class: dict[str, Any] = {}
    for k, name in enumerate(names):
        ev = class_threshold(np.concatenate([fitted_seen(seen[k], *fit[k]), fresh[k]]), c.quantile, c.min_images)
        ev["n_unseen"] = len(fresh[k])
        ev["unseen_minus_seen_mean"] = (float(fresh[k].mean() - seen[k].mean()) if len(seen[k]) and len(fresh[k])
                                        else None)
        ev["seen_shift"], ev["seen_stretch"] = fit[k]
        per_class[name] = ev
        ctx.log(f"calibrate: {name}: threshold {ev['threshold']:.4g} from {ev['n_images']} normal images "
                f"({len(fresh[k])} unseen; seen ones raised by {fit[k][0]:.3g}, "
                f"spread x{fit[k][1]:.2f}), {ev['rule']}")
    router = Router(image_means(ctx.cache), ctx.cache.image_class, names, c.route_quantile)
    save_torch_atomic(router.state(), ctx.files.routing)
    cal = {"key": calibration_key(cfg, train_key), "train_key": train_key,
           "source": "cross-fitted: every image unseen" if len(unseen) == len(scores)
           else "held-out images unseen, the rest seen by the model",
           "sigma": cfg.evaluate.sigma, "size": size, "settings": dataclasses.asdict(c),
           "classes": per_class, "image_scores": {ctx.cache.image_ids[i]: v for i, v in scores.items()},
           "routing": {n: {"ood_limit": float(router.ood_limit[k])} for k, n in enumerate(names)}}
    write_atomic(ctx.files.calibration, json.dumps(cal, indent=2, default=_nan))
    return cal


def _nan(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else float(v)


def read_calibration(files: RunFiles) -> dict[str, Any] | None:
    return read_json(files.calibration)


def load_router(files: RunFiles) -> Router | None:
    if not files.routing.is_file():
        return None
    return Router.from_state(torch.load(files.routing, map_location="cpu", weights_only=True))


def verdict_key(cfg: Config, files: RunFiles, train_key: str) -> str:
    """What verdicts depend on: the calibration and the thresholds in force
    (user overrides included); part of the evaluation's key."""
    cal = read_calibration(files)
    if cal is None:
        return "uncalibrated"
    v = verdicts_in_force(cal, files, cfg.calibrate)
    return settings_hash({"calibration": calibration_key(cfg, train_key), "thresholds": v.thresholds})


def ensure_calibrated(cfg: Config, files: RunFiles, train_key: str) -> dict[str, Any]:
    """The run's current calibration, or a one-line error saying how to make it."""
    cal = read_calibration(files)
    if cal is None:
        raise CladError(f"run {files.name!r} has no verdict calibration; run 'clad calibrate WORK --run {files.name}'")
    if cal.get("key") != calibration_key(cfg, train_key):
        raise CladError(f"{files.calibration}: made with other settings (sigma, map size or [calibrate]); "
                        f"run 'clad calibrate WORK --run {files.name}'")
    return cal

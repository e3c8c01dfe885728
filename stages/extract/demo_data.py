"""The built-in data set: small, deterministic, multi-class, in MVTec layout.

Three texture-like classes (weave, grain, speckle) and two objects (washer,
capsule). Every normal image varies (phase, colour jitter, position, noise),
defects are drawn with varied size and a modest contrast, and the masks are
the exact painted pixels. A random detector scores about 0.5; a detector
that only looks for extreme pixels does not reach 1.0 everywhere.

``n_classes`` > 0 writes that many generated classes instead (``c000-stripes``,
``c001-ring``, ...; see ``stages.extract.catalogue``), with the same layout and
the same defect painters.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from core.errors import CladError
from core.files import seeded, swap_into_place, temp_dir
from stages.extract.catalogue import catalogue, render
from stages.extract.synthesis import perlin_2d

SIZE = 256
TEXTURES = ("weave", "grain", "speckle")
OBJECTS = ("washer", "capsule")
CLASSES = TEXTURES + OBJECTS
DEFECTS = {
    "weave": ("thread", "hole", "stain"),
    "grain": ("scratch", "knot", "stain"),
    "speckle": ("cluster", "smear", "scratch"),
    "washer": ("chip", "spot", "crack"),
    "capsule": ("dent", "crack", "spot"),
}


def _grid() -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE


def _normal(cls: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A normal image ``[S,S,3]`` and its object mask ``[S,S]`` bool."""
    yy, xx = _grid()
    noise = rng.normal(0, 0.02, (SIZE, SIZE, 1))
    jitter = rng.uniform(-0.04, 0.04, 3)
    if cls == "weave":
        f = 16
        a = np.sin(2 * np.pi * f * xx + rng.uniform(0, 6.3)) * np.sin(2 * np.pi * f * yy + rng.uniform(0, 6.3))
        img = np.array([0.55, 0.45, 0.35]) + jitter + 0.18 * a[..., None]
        fg = np.ones((SIZE, SIZE), bool)
    elif cls == "grain":
        warp = perlin_2d((SIZE, SIZE), (4, 4), rng)
        a = np.sin(2 * np.pi * (10 * yy + 1.5 * warp) + rng.uniform(0, 6.3))
        img = np.array([0.62, 0.42, 0.25]) + jitter + 0.12 * a[..., None]
        fg = np.ones((SIZE, SIZE), bool)
    elif cls == "speckle":
        dots = ndimage.gaussian_filter((rng.random((SIZE, SIZE)) < 0.04).astype(float), 1.0) * 4
        img = np.array([0.35, 0.4, 0.45]) + jitter + 0.3 * np.clip(dots, 0, 1)[..., None]
        fg = np.ones((SIZE, SIZE), bool)
    elif cls == "washer":
        cy, cx = 0.5 + rng.uniform(-0.03, 0.03, 2)
        r = np.hypot(yy - cy, xx - cx)
        fg = (r < 0.34) & (r > 0.14)
        shade = 0.6 + 0.15 * (xx - cx) + 0.02 * perlin_2d((SIZE, SIZE), (8, 8), rng)
        img = np.where(fg[..., None], (shade[..., None] * np.array([0.85, 0.85, 0.9])), 0.12) + jitter * 0.5
    else:  # capsule
        cy, cx = 0.5 + rng.uniform(-0.03, 0.03, 2)
        d = np.hypot(np.clip(np.abs(xx - cx) - 0.22, 0, None), yy - cy)
        fg = d < 0.12
        left = xx < cx
        body = np.where(left[..., None], np.array([0.8, 0.25, 0.2]), np.array([0.9, 0.85, 0.7]))
        img = np.where(fg[..., None], body + jitter, np.array([0.25, 0.3, 0.3]))
    return np.clip(img + noise, 0, 1), fg


def _central(fg: np.ndarray) -> np.ndarray:
    """Defects start inside the central 70% so a 224 centre crop keeps them."""
    keep = np.zeros_like(fg)
    lo, hi = int(0.15 * SIZE), int(0.85 * SIZE)
    keep[lo:hi, lo:hi] = fg[lo:hi, lo:hi]
    return keep if keep.any() else fg


def _polyline_mask(rng: np.random.Generator, width: int, jagged: bool, fg: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(_central(fg))
    i = rng.integers(len(ys))
    y, x = float(ys[i]), float(xs[i])
    angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(30, 70)
    pts = [(x, y)]
    for _ in range(6):
        if jagged:
            angle += rng.uniform(-0.8, 0.8)
        x += np.cos(angle) * length / 6
        y += np.sin(angle) * length / 6
        pts.append((x, y))
    canvas = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(canvas).line(pts, fill=255, width=width)
    return np.asarray(canvas) > 0


def _blob_mask(rng: np.random.Generator, fg: np.ndarray, lo: float, hi: float,
               irregular: bool) -> np.ndarray:
    ys, xs = np.nonzero(_central(fg))
    i = rng.integers(len(ys))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    ry, rx = rng.uniform(lo, hi, 2) * SIZE
    r = ((yy - ys[i]) / ry) ** 2 + ((xx - xs[i]) / rx) ** 2
    if irregular:
        r = r + 0.6 * perlin_2d((SIZE, SIZE), (8, 8), rng)
    return r < 1


def _defect(cls: str, kind: str, img: np.ndarray, fg: np.ndarray, rng: np.random.Generator,
            ground: float | np.ndarray = 0.12) -> tuple[np.ndarray, np.ndarray]:
    """Paint a ``kind`` defect on ``img [S,S,3]`` inside ``fg [S,S]``; returns the image and
    its mask ``[S,S] uint8``. A chip is replaced by ``ground`` (the background colour)."""
    contrast = rng.uniform(0.12, 0.3) * rng.choice([-1, 1])
    if kind in ("scratch", "thread"):
        m = _polyline_mask(rng, int(rng.integers(2, 5)), False, fg)
    elif kind == "crack":
        m = _polyline_mask(rng, int(rng.integers(2, 4)), True, fg)
        contrast = -abs(contrast) - 0.1
    elif kind in ("hole", "knot", "spot", "dent"):
        m = _blob_mask(rng, fg, 0.02, 0.06, False)
    elif kind in ("stain", "cluster", "smear"):
        m = _blob_mask(rng, fg, 0.05, 0.12, True)
    else:  # chip: a bite out of the object edge, replaced by background
        edge = fg & ~ndimage.binary_erosion(fg, iterations=2)
        m = _blob_mask(rng, edge, 0.03, 0.07, False) & fg
    m &= fg
    out = img.copy()
    if kind == "stain":
        out[m] = out[m] * (1 - 0.5) + 0.5 * np.clip(out[m] + rng.uniform(-0.3, 0.3, 3), 0, 1)
    elif kind == "cluster":
        dots = ndimage.gaussian_filter((rng.random((SIZE, SIZE)) < 0.15).astype(float), 1.0) * 4
        out[m] = out[m] + 0.25 * np.clip(dots, 0, 1)[m][:, None]
    elif kind == "smear":
        blurred = ndimage.gaussian_filter(img, (4, 4, 0))
        out[m] = blurred[m]
    elif kind == "chip":
        out[m] = ground
    else:
        out[m] = out[m] + contrast
    return np.clip(out, 0, 1), m.astype(np.uint8)


def _save(arr: np.ndarray, path: Path, mode: str = "RGB", level: int = 6) -> None:
    """``[S,S,3]`` float in [0, 1] (RGB) or ``[S,S]`` 0/1 (L) -> PNG at zlib ``level``."""
    data = (arr * 255).round().astype(np.uint8) if mode == "RGB" else arr.astype(np.uint8) * 255
    Image.fromarray(data, mode).save(path, compress_level=level)


@dataclass(frozen=True)
class ClassSpec:
    """One class to write: how to draw a normal image and which defects it gets."""

    name: str
    normal: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]  # rng -> img [S,S,3], fg [S,S]
    defects: tuple[str, ...]
    ground: float | np.ndarray  # background colour, painted into chips
    png_level: int = 6  # zlib level: 1 encodes noisy images 2-5x faster at the same size


def class_specs(out: Path, classes: tuple[str, ...] | None = None, n_classes: int = 0,
                seed: int = 0) -> list[ClassSpec]:
    """What ``write_demo_dataset`` would write to ``out``: the built-in classes (all of them,
    or ``classes``) or ``n_classes`` catalogue classes. Raises CladError for bad arguments
    or a non-empty ``out``, before anything is written."""
    if n_classes < 0:
        raise CladError(f"demo-data: --n-classes {n_classes}: give a count >= 1 (0 = the built-in classes)")
    if n_classes and classes:
        raise CladError("demo-data: --classes picks built-in classes and --n-classes generates "
                        "new ones; give one of them")
    if not n_classes:
        unknown = sorted(set(classes or ()) - set(CLASSES))
        if unknown:
            raise CladError(f"demo-data: unknown class(es) {unknown}; choose from {', '.join(CLASSES)}")
    if out.exists() and any(out.iterdir()):
        raise CladError(f"{out}: folder exists and is not empty; choose a new folder or remove it")
    if n_classes:
        return [ClassSpec(lk.name, partial(render, lk, size=SIZE), lk.defects, np.asarray(lk.ground), 1)
                for lk in catalogue(seed, n_classes)]
    return [ClassSpec(cls, partial(_normal, cls), DEFECTS[cls], 0.12) for cls in classes or CLASSES]


def _write_class(base: Path, spec: ClassSpec, seed: int, n_train: int, n_test_good: int,
                 n_test_defect: int) -> None:
    """One class folder in MVTec layout: train/good, test/good, test/<kind>, ground_truth/<kind>."""
    (base / "train" / "good").mkdir(parents=True)
    (base / "test" / "good").mkdir(parents=True)
    for i in range(n_train):
        img, _ = spec.normal(seeded(seed, spec.name, "train", i))
        _save(img, base / "train" / "good" / f"{i:03d}.png", level=spec.png_level)
    for i in range(n_test_good):
        img, _ = spec.normal(seeded(seed, spec.name, "test", i))
        _save(img, base / "test" / "good" / f"{i:03d}.png", level=spec.png_level)
    for kind in spec.defects:
        (base / "test" / kind).mkdir(parents=True)
        (base / "ground_truth" / kind).mkdir(parents=True)
        for i in range(n_test_defect):
            rng = seeded(seed, spec.name, kind, i)
            img, fg = spec.normal(rng)
            bad, mask = _defect(spec.name, kind, img, fg, rng, spec.ground)
            _save(bad, base / "test" / kind / f"{i:03d}.png", level=spec.png_level)
            _save(mask, base / "ground_truth" / kind / f"{i:03d}_mask.png", "L", spec.png_level)


def write_demo_dataset(out: Path, seed: int = 0, n_train: int = 30, n_test_good: int = 8,
                       n_test_defect: int = 4, classes: tuple[str, ...] | None = None,
                       n_classes: int = 0, on_class: Callable[[str], None] | None = None) -> Path:
    """Write the data set under ``out`` (MVTec layout); returns ``out``.

    The built-in classes (all, or the subset ``classes``), or with ``n_classes``
    > 0 that many generated ones (``stages.extract.catalogue``). Deterministic
    in ``seed``. ``on_class(name)`` is called after each class is written.
    Written to a temporary folder and renamed, so a folder that exists is complete.
    """
    specs = class_specs(out, classes, n_classes, seed)
    tmp = temp_dir(out)
    for spec in specs:
        _write_class(tmp / spec.name, spec, seed, n_train, n_test_good, n_test_defect)
        if on_class is not None:
            on_class(spec.name)
    swap_into_place(tmp, out)
    return out

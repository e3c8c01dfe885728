"""The built-in data set: small, deterministic, multi-class, in MVTec layout.

Three texture-like classes (weave, grain, speckle) and two objects (washer,
capsule). Every normal image varies (phase, colour jitter, position, noise),
defects are drawn with varied size and a modest contrast, and the masks are
the exact painted pixels. A random detector scores about 0.5; a detector
that only looks for extreme pixels does not reach 1.0 everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from core.errors import CladError
from core.files import seeded, swap_into_place, temp_dir
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


def _defect(cls: str, kind: str, img: np.ndarray, fg: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
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
        out[m] = 0.12
    else:
        out[m] = out[m] + contrast
    return np.clip(out, 0, 1), m.astype(np.uint8)


def _save(arr: np.ndarray, path: Path, mode: str = "RGB") -> None:
    data = (arr * 255).round().astype(np.uint8) if mode == "RGB" else arr.astype(np.uint8) * 255
    Image.fromarray(data, mode).save(path)


def write_demo_dataset(out: Path, seed: int = 0, n_train: int = 30, n_test_good: int = 8,
                       n_test_defect: int = 4, classes: tuple[str, ...] = CLASSES) -> Path:
    """Write the data set under ``out`` (MVTec layout); returns ``out``.

    Deterministic in ``seed``. Written to a temporary folder and renamed, so a
    folder that exists is complete.
    """
    unknown = sorted(set(classes) - set(CLASSES))
    if unknown:
        raise CladError(f"demo-data: unknown class(es) {unknown}; choose from {', '.join(CLASSES)}")
    if out.exists() and any(out.iterdir()):
        raise CladError(f"{out}: folder exists and is not empty; choose a new folder or remove it")
    tmp = temp_dir(out)
    for cls in classes:
        base = tmp / cls
        (base / "train" / "good").mkdir(parents=True)
        (base / "test" / "good").mkdir(parents=True)
        for i in range(n_train):
            img, _ = _normal(cls, seeded(seed, cls, "train", i))
            _save(img, base / "train" / "good" / f"{i:03d}.png")
        for i in range(n_test_good):
            img, _ = _normal(cls, seeded(seed, cls, "test", i))
            _save(img, base / "test" / "good" / f"{i:03d}.png")
        for kind in DEFECTS[cls]:
            (base / "test" / kind).mkdir(parents=True)
            (base / "ground_truth" / kind).mkdir(parents=True)
            for i in range(n_test_defect):
                rng = seeded(seed, cls, kind, i)
                img, fg = _normal(cls, rng)
                bad, mask = _defect(cls, kind, img, fg, rng)
                _save(bad, base / "test" / kind / f"{i:03d}.png")
                _save(mask, base / "ground_truth" / kind / f"{i:03d}_mask.png", "L")
    swap_into_place(tmp, out)
    return out

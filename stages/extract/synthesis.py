"""GLASS-style local anomaly synthesis (pure numpy; docs/METHOD.md section 1).

``synthesize`` turns one normal image into an anomalous one: two rotated,
thresholded Perlin masks combined by union / intersection / one alone
(probability 1/3 each), intersected with a foreground mask, filled with an
augmented texture blended with transparency beta (eq. 3 of the paper):

    x+ = x (1 - m) + (1 - beta) tex m + beta x m

Every random draw comes from a generator seeded by (seed, image id, variant)
(``core.files.seeded``), so a re-run or resumed extraction produces identical images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from scipy import ndimage

from core.settings import SynthesisConfig
from stages.extract.data import IMAGE_SUFFIXES, load_rgb


# -- Perlin noise -----------------------------------------------------------
def perlin_2d(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Gradient noise ``[H, W]`` with ``res`` periods per axis (GLASS perlin.py).

    Fade 6t^5 - 15t^4 + 10t^3; the output is scaled by sqrt(2) so its range is
    about [-1, 1]. H and W must be divisible by res.
    """
    h, w = shape
    d = (h // res[0], w // res[1])
    gy = (np.arange(h, dtype=np.float32) * (res[0] / h)) % 1
    gx = (np.arange(w, dtype=np.float32) * (res[1] / w)) % 1
    gy, gx = np.broadcast_to(gy[:, None], (h, w)), np.broadcast_to(gx[None, :], (h, w))
    angles = 2 * np.pi * rng.random((res[0] + 1, res[1] + 1))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    def corner(oy: int, ox: int) -> np.ndarray:
        # gradient of the lattice corner (oy, ox) of each cell, dotted with the offset
        c = np.repeat(np.repeat(cos[oy:oy + res[0], ox:ox + res[1]], d[0], 0), d[1], 1)
        s = np.repeat(np.repeat(sin[oy:oy + res[0], ox:ox + res[1]], d[0], 0), d[1], 1)
        return c * (gy - oy) + s * (gx - ox)

    n00, n10, n01, n11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)
    ty = 6 * gy**5 - 15 * gy**4 + 10 * gy**3
    tx = 6 * gx**5 - 15 * gx**4 + 10 * gx**3
    n0 = n00 * (1 - ty) + ty * n10
    n1 = n01 * (1 - ty) + ty * n11
    return np.float32(np.sqrt(2)) * ((1 - tx) * n0 + tx * n1)


def perlin_mask(size: int, cfg: SynthesisConfig, rng: np.random.Generator) -> np.ndarray:
    """One binary Perlin mask ``[S, S]`` float32: random scale, rotation in [-90, 90] deg."""
    valid = [k for k in range(cfg.perlin_max_scale + 1) if size % (2**k) == 0]
    sx, sy = 2 ** rng.choice(valid), 2 ** rng.choice(valid)
    noise = perlin_2d((size, size), (int(sx), int(sy)), rng)
    noise = ndimage.rotate(noise, rng.uniform(-90, 90), reshape=False, order=1, cval=0.0)
    return (noise > cfg.perlin_threshold).astype(np.float32)


def combine_masks(m1: np.ndarray, m2: np.ndarray, u: float) -> np.ndarray:
    """Eq. 2: union, intersection or the first mask alone, 1/3 each."""
    if u > 2 / 3:
        return np.maximum(m1, m2)
    if u > 1 / 3:
        return m1 * m2
    return m1


def feature_grid(size: int, stride: int) -> int:
    """Side of the feature map of a ``size`` px image at ``stride``: ceil(S / stride).

    Both TF 'same' padding and the usual k=3, pad=1 stride-2 convolutions give
    ceil at every stage (and nested ceils of integer divisions are one ceil),
    so 300 px at stride 8 gives 38 x 38 features, not 37 x 37.
    """
    return -(-size // stride)


def feature_mask(mask: np.ndarray, stride: int) -> np.ndarray:
    """``[S, S]`` pixel mask -> ``[ceil(S/stride), ceil(S/stride)]`` bool.

    Coverage rule: a patch is anomalous if any pixel of its stride x stride
    cell is masked (max-pool), as GLASS does. Cell j covers pixels
    [j*stride, (j+1)*stride); the last cell of a size that stride does not
    divide is partial (padded with zeros), as the backbone's padding is.
    """
    h, w = mask.shape
    gh, gw = feature_grid(h, stride), feature_grid(w, stride)
    padded = np.zeros((gh * stride, gw * stride), mask.dtype)
    padded[:h, :w] = mask
    return padded.reshape(gh, stride, gw, stride).max(axis=(1, 3)) > 0


# -- foreground --------------------------------------------------------------
def otsu_threshold(gray: np.ndarray) -> float:
    hist, edges = np.histogram(gray, bins=256, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * omega - mu) ** 2 / np.maximum(omega * (1 - omega), 1e-12)
    return float(edges[int(np.argmax(between)) + 1])


def foreground_mask(image: np.ndarray, is_texture: bool) -> np.ndarray:
    """``[S, S, 3]`` in [0,1] -> ``[S, S]`` float32 foreground.

    Textures are all foreground. Objects: grey, blur, Otsu; the side holding
    most border pixels is background; close and fill holes; a mask covering
    less than 2% or more than 98% is replaced by all ones.
    """
    if is_texture:
        return np.ones(image.shape[:2], np.float32)
    gray = ndimage.gaussian_filter(image.mean(axis=2), 2.0)
    fg = gray > otsu_threshold(gray)
    border = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
    if border.mean() > 0.5:
        fg = ~fg
    fg = ndimage.binary_fill_holes(ndimage.binary_closing(fg, iterations=3))
    if not 0.02 <= fg.mean() <= 0.98:
        return np.ones(image.shape[:2], np.float32)
    return fg.astype(np.float32)


# -- textures ----------------------------------------------------------------
class TextureSource:
    """Texture images from a folder (DTD) or, when none is given, procedural ones."""

    def __init__(self, folder: str = ""):
        self.files: list[str] = []
        if folder:
            root = Path(folder).expanduser()
            self.files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)

    def draw(self, size: int, rng: np.random.Generator) -> Image.Image:
        if self.files:
            return load_rgb(self.files[int(rng.integers(len(self.files)))]).resize((size, size), Image.BILINEAR)
        return procedural_texture(size, rng)


def procedural_texture(size: int, rng: np.random.Generator) -> Image.Image:
    """A colourful random texture: Perlin octaves, stripes and speckle mixed."""
    octaves = sum(perlin_2d((size, size), (2**k, 2**k), rng) / (k + 1)
                  for k in range(1, 5) if size % 2**k == 0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    freq, angle = rng.uniform(4, 24), rng.uniform(0, np.pi)
    stripes = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    speckle = rng.random((size, size))
    w = rng.dirichlet(np.ones(3))
    base = w[0] * octaves + w[1] * stripes + w[2] * (speckle - 0.5) * 2
    base = (base - base.min()) / max(np.ptp(base), 1e-6)
    colours = rng.random((2, 3))
    rgb = colours[0] * base[..., None] + colours[1] * (1 - base[..., None])
    return Image.fromarray((rgb * 255).astype(np.uint8))


def _hue_shift(im: Image.Image, shift: float) -> Image.Image:
    hsv = np.asarray(im.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(shift * 255)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def augment_texture(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Apply 3 distinct of the 9 GLASS augmentations, in drawn order."""
    ops = rng.choice(9, size=3, replace=False)
    for op in ops:
        if op == 0:
            im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.8, 1.2))
        elif op == 1:
            im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))
        elif op == 2:
            im = _hue_shift(ImageEnhance.Color(im).enhance(rng.uniform(0.8, 1.2)), rng.uniform(-0.2, 0.2))
        elif op == 3:
            im = ImageOps.mirror(im)
        elif op == 4:
            im = ImageOps.flip(im)
        elif op == 5:
            im = ImageOps.grayscale(im).convert("RGB")
        elif op == 6:
            im = ImageOps.autocontrast(im)
        elif op == 7:
            im = ImageOps.equalize(im)
        else:
            im = im.rotate(rng.uniform(-45, 45), resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    return im


def blend(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """Eq. 3: ``x (1-m) + (1-beta) tex m + beta x m``; beta is the original's share."""
    m = mask[..., None]
    return image * (1 - m) + (1 - beta) * texture * m + beta * image * m


@dataclass
class Synthetic:
    """One synthesized anomaly image and what training needs of it."""

    image: np.ndarray  # [S, S, 3] float32 in [0, 1]
    mask: np.ndarray  # [S, S] float32 pixel mask
    patch_mask: np.ndarray  # [ceil(S/stride), ceil(S/stride)] bool
    beta: float
    used_foreground: bool


def synthesize(image: np.ndarray, fg: np.ndarray, textures: TextureSource, cfg: SynthesisConfig,
               stride: int, rng: np.random.Generator) -> Synthetic:
    """One anomalous version of ``image``; redraws until a patch is covered.

    After ``cfg.max_tries`` empty draws (a tiny foreground), the foreground is
    ignored for this image (reported via ``used_foreground=False``).
    """
    size = image.shape[0]
    used_fg = True
    for attempt in range(2 * cfg.max_tries):
        if attempt == cfg.max_tries:
            used_fg, fg = False, np.ones_like(fg)
        m = combine_masks(perlin_mask(size, cfg, rng), perlin_mask(size, cfg, rng), rng.random()) * fg
        pm = feature_mask(m, stride)
        if pm.any():
            break
    else:  # pragma: no cover - Perlin masks with fg=1 are never empty this often
        raise RuntimeError("anomaly synthesis produced only empty masks")
    tex = np.asarray(augment_texture(textures.draw(size, rng), rng), np.float32) / 255.0
    beta = float(np.clip(rng.normal(cfg.beta_mean, cfg.beta_std), cfg.beta_min, cfg.beta_max))
    return Synthetic(blend(image, tex, m, beta).astype(np.float32), m, pm, beta, used_fg)


# -- validation-only synthesis ---------------------------------------------------
def cut_paste(image: np.ndarray, fg: np.ndarray, rng: np.random.Generator, scar: bool = False
              ) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste (Li et al., 2021): a piece of the same image, colour-jittered,
    moved onto the foreground elsewhere; ``scar`` cuts a thin rotated stripe.

    A structural defect with no foreign texture. Training never sees it, so a
    probe built from it can rank settings without favouring the discriminator
    that learned the training synthesis. Returns (image, uint8 pixel mask).
    """
    s = image.shape[0]
    if scar:  # CutPaste-Scar: 2-16 x 10-25 px at 256, scaled to this size
        w = max(1, int(rng.integers(2, 17) * s / 256))
        h = max(2, int(rng.integers(10, 26) * s / 256))
    else:  # area 2-15 % of the image, aspect ratio 0.3-3.3
        area = rng.uniform(0.02, 0.15) * s * s
        aspect = float(np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3))))
        w = int(np.clip(round(np.sqrt(area * aspect)), 1, s - 1))
        h = int(np.clip(round(np.sqrt(area / aspect)), 1, s - 1))
    x0, y0 = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1))
    piece = Image.fromarray((image[y0:y0 + h, x0:x0 + w] * 255).round().astype(np.uint8))
    piece = ImageEnhance.Brightness(piece).enhance(rng.uniform(0.9, 1.1))
    piece = ImageEnhance.Contrast(piece).enhance(rng.uniform(0.9, 1.1))
    alpha = Image.new("L", piece.size, 255)
    if scar:
        angle = rng.uniform(-45, 45)
        piece = piece.rotate(angle, Image.BILINEAR, expand=True)
        alpha = alpha.rotate(angle, Image.NEAREST, expand=True)
    pw, ph = piece.size
    ys, xs = np.nonzero(fg > 0) if (fg > 0).any() else np.nonzero(np.ones_like(fg))
    k = int(rng.integers(len(ys)))
    top = int(np.clip(ys[k] - ph // 2, 0, max(0, s - ph)))
    left = int(np.clip(xs[k] - pw // 2, 0, max(0, s - pw)))
    a = (np.asarray(alpha) > 127)[: s - top, : s - left]
    p = np.asarray(piece, np.float32)[: s - top, : s - left] / 255.0
    out = image.astype(np.float32)  # a copy
    region = out[top:top + a.shape[0], left:left + a.shape[1]]
    region[a] = p[a]
    mask = np.zeros((s, s), np.uint8)
    mask[top:top + a.shape[0], left:left + a.shape[1]] = a
    return out, mask

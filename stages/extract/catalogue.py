"""A procedural catalogue of demo classes (``clad demo-data DIR --n-classes N``).

Class ``i`` is named ``c{i:03d}-{family}`` (``c007-grain``); its family is
``FAMILIES[i % len(FAMILIES)]``, so any N mixes textures and objects evenly.
Its look (palette, frequency, orientation, size, background, its 3 defect
kinds) is drawn from ``seeded(seed, "catalogue", i)``; only hue and the
family's main shape parameter (and an object's background hue) are placed by a low-discrepancy (R3) sequence
over the family's members, so that two classes of one family never come out
alike by chance. A class depends on (seed, i) alone, never on N: the first 15
classes of ``--n-classes 50`` are the classes of ``--n-classes 15``.

Within a class, every image varies as the built-in classes do: phase, a small
shift and turn, colour jitter, pixel noise, fresh Perlin fields.

Renderers work on a ``[S, S]`` grid of coordinates in image sides and return
``(t, fg)``: ``t [S, S]`` in [0, 1] mixes the class's two colours (paper at 0,
ink at 1) and ``fg [S, S] bool`` is the object (all True for a texture).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from core.files import seeded
from stages.extract.synthesis import perlin_2d

Field = tuple[np.ndarray, np.ndarray]  # (t [S, S] float in [0, 1], fg [S, S] bool)
R3 = (0.8191725133961645, 0.6710436067037893, 0.5497004779019703)  # R3 sequence steps: hue, shape, ground hue


@dataclass(frozen=True)
class Look:
    """What one catalogue class looks like; fixed for all its images."""

    name: str
    family: str
    ink: tuple[float, float, float]  # RGB in [0, 1]: texture marks / object body
    paper: tuple[float, float, float]  # texture ground / object's second tone
    ground: tuple[float, float, float]  # an object's background (textures: = paper)
    freq: float  # cycles (or Perlin periods) per image side
    angle: float  # orientation, radians
    shape: tuple[float, ...]  # the family's own parameters (see its renderer)
    defects: tuple[str, ...]  # 3 kinds of demo_data._defect


@dataclass(frozen=True)
class Family:
    """A kind of look: a renderer and what its classes may vary."""

    name: str
    is_object: bool
    freq: tuple[float, float]  # log-uniform range of Look.freq
    defects: tuple[str, ...]  # pool of kinds (each a different painter); 3 are drawn
    params: Callable[[np.random.Generator, float], tuple[float, ...]]  # (rng, q in [0,1)) -> shape
    render: Callable[[Look, np.random.Generator, np.ndarray, np.ndarray], Field]


# -- geometry -----------------------------------------------------------------

def _frame(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
           angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid ``[S, S]`` -> coordinates ``(u, v)`` ``[S, S]`` centred on (cy, cx), turned by angle."""
    c, s = np.cos(angle), np.sin(angle)
    return (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c


def _texture_frame(look: Look, rng: np.random.Generator, yy: np.ndarray,
                   xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A texture's coordinates ``(u, v)`` ``[S, S]``: a random phase, a slight turn."""
    cy, cx = rng.uniform(0, 1, 2)
    return _frame(yy, xx, cy, cx, look.angle + rng.uniform(-0.03, 0.03))


def _object_frame(look: Look, rng: np.random.Generator, yy: np.ndarray,
                  xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An object's coordinates ``(u, v)`` ``[S, S]``: centre shifted by up to 3 %, turned by up to 3 deg."""
    cy, cx = 0.5 + rng.uniform(-0.03, 0.03, 2)
    return _frame(yy, xx, cy, cx, look.angle + rng.uniform(-0.05, 0.05))


def _soft(a: np.ndarray, sharp: float) -> np.ndarray:
    """``[S, S]`` in [-1, 1] -> [0, 1], squashed towards 0 and 1 by ``sharp`` > 0."""
    return 0.5 + 0.5 * np.tanh(sharp * a) / np.tanh(sharp)


def _fbm(rng: np.random.Generator, size: int, res: int, octaves: int = 3) -> np.ndarray:
    """Fractal Perlin noise ``[S, S]``, about [-1.5, 1.5]; ``res`` periods at the coarsest octave."""
    out = np.zeros((size, size), np.float32)
    for k in range(octaves):
        r = min(res * 2**k, size // 4)
        out += 0.5**k * perlin_2d((size, size), (r, r), rng)
    return out


# -- textures -------------------------------------------------------------------

def _stripes(look: Look, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Field:
    """Parallel bands; shape = (sharpness,)."""
    u, _ = _texture_frame(look, rng, yy, xx)
    return _soft(np.sin(2 * np.pi * look.freq * u), look.shape[0]), np.ones(yy.shape, bool)


def _checks(look: Look, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Field:
    """A turned chequerboard; shape = (sharpness,)."""
    u, v = _texture_frame(look, rng, yy, xx)
    a = np.sin(2 * np.pi * look.freq * u) * np.sin(2 * np.pi * look.freq * v)
    return _soft(a, look.shape[0]), np.ones(yy.shape, bool)


def _dots(look: Look, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Field:
    """A lattice of round dots; shape = (radius in cells, row stagger 0 or 0.5)."""
    u, v = _texture_frame(look, rng, yy, xx)
    fv = look.freq * v
    fu = look.freq * u + look.shape[1] * np.floor(fv)
    d = np.hypot(fu - np.floor(fu) - 0.5, fv - np.floor(fv) - 0.5)
    return np.clip((look.shape[0] + 0.04 - d) / 0.08, 0, 1), np.ones(yy.shape, bool)


def _grain(look: Look, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Field:
    """Wood-like bands bent by Perlin noise; shape = (warp, Perlin periods)."""
    u, _ = _texture_frame(look, rng, yy, xx)
    warp = perlin_2d(yy.shape, (int(look.shape[1]),) * 2, rng)
    return 0.5 + 0.5 * np.sin(2 * np.pi * (look.freq * u + look.shape[0] * warp)), np.ones(yy.shape, bool)


def _marble(look: Look, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Field:
    """Thin turbulent veins; shape = (turbulence, vein thinness)."""
    u, _ = _texture_frame(look, rng, yy, xx)
    turb = _fbm(rng, yy.shape[0], 4)
    veins = 1 - np.abs(np.sin(np.pi * (look.freq * u + look.shape[0] * turb)))
    return veins ** look.shape[1], np.ones(yy.shape, bool)


def _cloud(look: Look, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Field:
    """Mottled blotches (fractal Perlin, thresholded softly); freq = coarsest periods; shape = (sharpness,)."""
    res = int(2 ** round(np.log2(look.freq)))
    return _soft(np.clip(_fbm(rng, yy.shape[0], res) / 1.2, -1, 1), look.shape[0]), np.ones(yy.shape, bool)


# -- objects --------------------------------------------------------------------

def _ring(look: Look, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Field:
    """An annulus lit from one side; shape = (outer radius, inner / outer)."""
    u, v = _object_frame(look, rng, yy, xx)
    r_out, ratio = look.shape
    r = np.hypot(u, v)
    return np.clip(0.6 + 0.4 * u / r_out, 0, 1), (r < r_out) & (r > ratio * r_out)


def _capsule(look: Look, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Field:
    """A rounded bar in two tones (ink, paper); shape = (half length, radius)."""
    u, v = _object_frame(look, rng, yy, xx)
    half, radius = look.shape
    fg = np.hypot(np.clip(np.abs(u) - half, 0, None), v) < radius
    return (u < 0).astype(np.float32) * (1 - 0.25 * (v / radius) ** 2), fg


def _plate(look: Look, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Field:
    """A rounded rectangle, brushed along its length at look.freq; shape = (half width, half height, corner)."""
    u, v = _object_frame(look, rng, yy, xx)
    a, b, corner = look.shape
    qu, qv = np.abs(u) - a + corner, np.abs(v) - b + corner
    d = np.hypot(np.clip(qu, 0, None), np.clip(qv, 0, None)) + np.minimum(np.maximum(qu, qv), 0) - corner
    brushed = 0.75 + 0.25 * np.sin(2 * np.pi * look.freq * v + rng.uniform(0, 6.3))
    return brushed, d < 0


def _disc(look: Look, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Field:
    """A domed disc with holes on a circle; shape = (radius, holes, hole radius, hole offset / radius)."""
    u, v = _object_frame(look, rng, yy, xx)
    radius, holes, hole_r, offset = look.shape
    fg = np.hypot(u, v) < radius
    for k in range(int(holes)):
        a = 2 * np.pi * k / holes
        fg &= np.hypot(u - offset * radius * np.cos(a), v - offset * radius * np.sin(a)) > hole_r
    return 1 - 0.6 * (np.hypot(u, v) / radius) ** 2, fg


def _polygon(look: Look, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> Field:
    """A regular polygon (a nut) with faceted shading; shape = (circumradius, sides, hole / circumradius)."""
    u, v = _object_frame(look, rng, yy, xx)
    radius, sides, hole = look.shape
    theta, r = np.arctan2(v, u) % (2 * np.pi), np.hypot(u, v)
    sector = 2 * np.pi / sides
    edge = radius * np.cos(np.pi / sides) / np.cos(theta % sector - np.pi / sides)
    facet = np.floor(theta / sector)
    return 0.3 + 0.7 * ((facet * 0.618) % 1), (r < edge) & (r > hole * radius)


# -- the families -----------------------------------------------------------------

def _lerp(lo: float, hi: float, q: float) -> float:
    return lo + (hi - lo) * q


TEXTURE_FAMILIES = (
    Family("stripes", False, (4, 24), ("thread", "hole", "stain", "smear", "crack"),
           lambda rng, q: (rng.uniform(1, 5),), _stripes),
    Family("checks", False, (3, 12), ("scratch", "hole", "stain", "smear", "cluster"),
           lambda rng, q: (rng.uniform(1, 5),), _checks),
    Family("dots", False, (4, 14), ("scratch", "hole", "stain", "smear", "cluster"),
           lambda rng, q: (rng.uniform(0.18, 0.34), float(rng.choice([0.0, 0.5]))), _dots),
    Family("grain", False, (5, 16), ("scratch", "knot", "stain", "smear", "crack"),
           lambda rng, q: (rng.uniform(0.8, 2.5), float(rng.choice([2, 4, 8]))), _grain),
    Family("marble", False, (1.5, 5), ("scratch", "knot", "stain", "crack", "cluster"),
           lambda rng, q: (rng.uniform(1.5, 4), rng.uniform(4, 12)), _marble),
    Family("cloud", False, (2, 8), ("scratch", "hole", "stain", "cluster", "crack"),
           lambda rng, q: (rng.uniform(1.5, 5),), _cloud),
)
OBJECT_FAMILIES = (
    Family("ring", True, (1, 1), ("chip", "spot", "crack", "scratch", "stain"),
           lambda rng, q: (rng.uniform(0.32, 0.4), _lerp(0.25, 0.7, q)), _ring),
    Family("capsule", True, (1, 1), ("dent", "crack", "scratch", "stain", "chip"),
           lambda rng, q: (_lerp(0.14, 0.26, q), rng.uniform(0.11, 0.16)), _capsule),
    Family("plate", True, (6, 30), ("chip", "dent", "scratch", "stain", "crack", "smear"),
           lambda rng, q: (rng.uniform(0.3, 0.38), _lerp(0.16, 0.32, q), rng.uniform(0.01, 0.08)), _plate),
    Family("disc", True, (1, 1), ("chip", "spot", "crack", "scratch", "stain"),
           lambda rng, q: (rng.uniform(0.32, 0.4), float(1 + int(4 * q)), rng.uniform(0.035, 0.07),
                           rng.uniform(0.3, 0.55)), _disc),
    Family("polygon", True, (1, 1), ("chip", "spot", "crack", "scratch", "stain"),
           lambda rng, q: (rng.uniform(0.32, 0.4), float(3 + int(6 * q)), rng.uniform(0.0, 0.45)), _polygon),
)
# interleaved so that every run of 11 consecutive classes holds each family once
FAMILIES = tuple(f for pair in zip(TEXTURE_FAMILIES, OBJECT_FAMILIES + (None,)) for f in pair if f is not None)
BY_NAME = {f.name: f for f in FAMILIES}


# -- palettes and looks -------------------------------------------------------------

def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return tuple(float(c) for c in colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))))


def _palette(rng: np.random.Generator, hue: float, ground_hue: float,
             is_object: bool) -> tuple[tuple[float, float, float], ...]:
    """(ink, paper, ground) RGB for a class: paper a darker shade, a neighbour or the
    complement of ink; an object's ground a dark or light tint of ``ground_hue``,
    dark under a bright ink."""
    s, v = rng.uniform(0.5 if is_object else 0.35, 0.9), rng.uniform(0.55, 0.95)
    ink = _hsv(hue, s, v)
    relation = rng.choice(["shade", "neighbour", "complement"])
    if relation == "shade":
        paper = _hsv(hue, s * rng.uniform(0.6, 1.0), v * rng.uniform(0.25, 0.5))
    elif relation == "neighbour":
        paper = _hsv(hue + rng.choice([-1, 1]) * rng.uniform(0.08, 0.18), s * 0.8, v * rng.uniform(0.35, 0.6))
    else:
        paper = _hsv(hue + 0.5, rng.uniform(0.3, 0.8), rng.uniform(0.25, 0.55))
    if not is_object:
        return ink, paper, paper
    dark = v > 0.75 or rng.random() < 0.5
    ground = _hsv(ground_hue, rng.uniform(0.15, 0.5), rng.uniform(0.08, 0.28) if dark else rng.uniform(0.72, 0.9))
    return ink, paper, ground


def look(seed: int, i: int) -> Look:
    """The look of catalogue class ``i`` (0-based) for ``seed``."""
    family = FAMILIES[i % len(FAMILIES)]
    k = i // len(FAMILIES)  # this class's rank among its family's members
    hue, q, ground_hue = (seeded(seed, "catalogue", family.name).random(3) + k * np.asarray(R3)) % 1.0
    rng = seeded(seed, "catalogue", i)
    ink, paper, ground = _palette(rng, hue, ground_hue, family.is_object)
    lo, hi = family.freq
    picked = sorted(rng.choice(len(family.defects), 3, replace=False))
    return Look(name=f"c{i:03d}-{family.name}", family=family.name, ink=ink, paper=paper, ground=ground,
                freq=float(lo * (hi / lo) ** q), angle=float(rng.uniform(0, np.pi)),
                shape=tuple(float(p) for p in family.params(rng, q)),
                defects=tuple(family.defects[j] for j in picked))


def catalogue(seed: int, n: int) -> list[Look]:
    """The first ``n`` catalogue classes for ``seed``, in name order."""
    return [look(seed, i) for i in range(n)]


def render(lk: Look, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A normal image ``[S, S, 3]`` float in [0, 1] and its object mask ``[S, S]`` bool."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t, fg = BY_NAME[lk.family].render(lk, rng, yy, xx)
    jitter = rng.uniform(-0.04, 0.04, 3)
    body = np.asarray(lk.paper) * (1 - t[..., None]) + np.asarray(lk.ink) * t[..., None] + jitter
    img = np.where(fg[..., None], body, np.asarray(lk.ground) + 0.5 * jitter)
    return np.clip(img + rng.normal(0, 0.02, (size, size, 1)), 0, 1), fg

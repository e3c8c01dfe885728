"""CLAD's score mix: the discriminator's score s alone (the paper), or s blended
with the nearest-neighbour distance d in the run's adaptor space, per class.

Why (docs/RESULTS.md, "CLAD that works", rounds 6-7): on the held-out probe
(held-out normal training images and their CutPaste/Scar versions; no test
label) the adaptor space outlines some classes' defects better than the
discriminator does (bottle in the seven-class model: probe AUPRO 86.5 by d,
82.3 by s) and others worse; a blend beat both on transistor's probe. So the
choice is made per class, on that class's probe, where the class has enough
held-out images to rank three candidates (``score_mix_min_images``); the
classes with fewer choose one weight together on their pooled probe (as the
verdict calibration pools them), or keep s where even together they are too few.

A class's score is ``a s + b d + c``: with weight w, s and d each in units of
the class's held-out normal patches (mean 0, std 1), ``(1 - w) s' + w d'``.
w = 0 keeps s itself (a = 1, b = c = 0), so a class that keeps s scores
exactly as the head without a mix does. d is the distance to the class's own
bank: the adaptor outputs of its normal training rows (held-out images
excluded), read from the cache when the head first scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stages.heads.clad_model import CladModel
from stages.search import MemoryBank

WEIGHTS = (0.0, 0.5, 1.0)  # the candidates: s alone, the blend, d alone
FORCED = {"blend": 0.5, "distance": 1.0}  # score_mix settings that give every class with a probe one weight


def mix_coefficients(weight: float, s_ref: tuple[float, float], d_ref: tuple[float, float]) -> tuple[float, ...]:
    """(a, b, c) of ``a s + b d + c`` for blend weight ``weight`` and the (mean, std) of s and d on
    the class's held-out normal patches; weight 0 gives (1, 0, 0): s unchanged."""
    if weight == 0:
        return 1.0, 0.0, 0.0
    (sm, ss), (dm, ds) = s_ref, d_ref
    a, b = (1 - weight) / max(ss, 1e-12), weight / max(ds, 1e-12)
    return a, b, -(a * sm + b * dm)


def choose_weight(pixel: dict[float, float]) -> float:
    """The weight with the highest probe ``pixel`` metric (mean of pixel AUROC and AUPRO);
    ties go to the smaller weight (s, the paper's scorer, first)."""
    return max(sorted(pixel), key=lambda w: (pixel[w], -w))


def mean_ranks(pixel: list[dict[float, float]]) -> dict[float, float]:
    """Per weight, its mean rank over classes (1 = the class's best probe metric; tied
    metrics share the mean of their ranks): each class one vote, whatever its metric's scale.

    Why not the mean metric: a class whose probe sees nothing moves its metric far and at
    random (speckle in the seven-class model: 0.333 / 0.267 / 0.218 around chance, 0.325),
    and outweighs four classes whose probes agree within 0.01 to 0.03 of each other."""
    ranks: dict[float, list[float]] = {w: [] for w in pixel[0]}
    for p in pixel:
        for w, v in p.items():
            above = sum(x > v for x in p.values())
            ranks[w].append(above + (sum(x == v for x in p.values()) + 1) / 2)
    return {w: float(np.mean(r)) for w, r in ranks.items()}


def reference(values: torch.Tensor) -> tuple[float, float]:
    """(mean, sample std) of patch scores: the unit a class's scores are measured in."""
    v = values.double().reshape(-1)
    return float(v.mean()), float(v.std()) if len(v) > 1 else 1.0


@dataclass
class ScoreMix:
    """Per label (class): the coefficients of ``a s + b d + c`` ``[N]`` each, and the
    training images whose normal rows form the banks of the classes with ``b != 0``."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    bank_images: np.ndarray  # [M] int64 image indices of the cache
    choices: list[dict[str, Any]] = field(default_factory=list)  # per class: what the probe measured

    @property
    def mixed(self) -> list[int]:
        """Labels whose score uses d."""
        return [int(k) for k in np.nonzero(self.b)[0]]

    def state(self) -> dict[str, torch.Tensor]:
        return {"a": torch.from_numpy(self.a), "b": torch.from_numpy(self.b), "c": torch.from_numpy(self.c),
                "bank_images": torch.from_numpy(self.bank_images.astype(np.int64))}

    @classmethod
    def from_state(cls, d: dict[str, torch.Tensor]) -> ScoreMix:
        return cls(d["a"].numpy(), d["b"].numpy(), d["c"].numpy(), d["bank_images"].numpy())


@torch.no_grad()
def embed(model: CladModel, rows: np.ndarray | torch.Tensor, device: torch.device,
          chunk: int = 65536) -> np.ndarray:
    """``[M, C_d]`` rows -> ``[M, D]`` float32 adaptor outputs (eval mode)."""
    model.eval()
    x = torch.as_tensor(rows)
    out = [model.adaptor(x[s:s + chunk].to(device).float()).float().cpu() for s in range(0, len(x), chunk)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.adaptor.out_dim), np.float32)


@torch.no_grad()
def model_parts(model: CladModel, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[n, H*W, C_d]`` -> (adaptor outputs ``[n, H*W, D]``, s ``[n, H*W]`` as
    ``CladModel.score_images`` gives it, each image's class ``[n]``)."""
    model.eval()
    z, s, probs = model.image_parts(maps)
    return z, s, probs.mean(1).argmax(1)


@torch.no_grad()
def mixed_scores(model: CladModel, mix: ScoreMix, banks: dict[int, MemoryBank], maps: torch.Tensor,
                 chunk: int = 65536) -> torch.Tensor:
    """``[n, H*W, C_d]`` maps -> ``[n, H*W]`` scores: every image by its class's coefficients
    (the class the discriminator's classification head gives the image)."""
    per_call = max(1, chunk // max(maps.shape[1], 1))
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(maps), per_call):
        z, s, cls = (t.cpu() for t in model_parts(model, maps[i:i + per_call].to(device).float()))
        y = s.clone()
        for k in {int(v) for v in cls} & set(banks):
            rows = cls == k
            d = banks[k].score(z[rows].reshape(-1, z.shape[-1])).reshape(int(rows.sum()), -1)
            y[rows] = float(mix.a[k]) * s[rows] + float(mix.b[k]) * d + float(mix.c[k])
        out.append(y.float())
    return torch.cat(out) if out else torch.zeros(maps.shape[:2])


def class_bank(model: CladModel, cache: Any, images: np.ndarray, device: torch.device) -> MemoryBank:
    """The adaptor-space bank of the normal rows of ``images`` (bool ``[n_images]``; only
    the shards that hold them are read)."""
    from stages.heads.knn import bank_rows

    return MemoryBank(embed(model, bank_rows(cache, images)[0], device))


def fit_mix(model: CladModel, mode: str, min_images: int, ctx: Any,
            pool: str = "mean") -> tuple[ScoreMix | None, dict[int, MemoryBank]]:
    """Choose each class's weight on the probe (``mode`` probe) or give every class with a probe
    ``FORCED[mode]``; the mix (``mixed`` empty where every class keeps s) and the banks of the
    classes that use d; ``(None, {})`` without a probe or class labels.

    With ``probe``, as the verdict calibration fits its shift (``stages.train.calibrate.seen_fit``):
    a class with at least ``min_images`` held-out images chooses on its own probe; the other
    classes choose one weight together where they hold that many held-out images between them (``pool``:
    on the mean of their probe metrics, or on their mean rank, each class one vote), and keep s otherwise.
    ``ctx``: the run's ``TrainContext``.
    """
    cache, probe = ctx.cache, ctx.probe_set()
    if probe is None:
        ctx.log("train: score mix: no held-out probe, so s alone")
        return None, {}
    if not np.array_equal(ctx.labels, cache.image_class):
        ctx.log("train: score mix: the labels are not the classes (data.labels = pseudo), so s alone")
        return None, {}
    weights = WEIGHTS if mode == "probe" else (FORCED[mode],)
    measured: dict[int, dict[str, Any]] = {}  # class -> held-out count, refs, probe pixel per weight, bank
    for k, name in enumerate(cache.class_names):
        if name not in probe.features:
            continue
        masks = probe.masks[name]
        normal = torch.from_numpy(masks.reshape(len(masks), -1).max(1) == 0)
        bank = class_bank(model, cache, (cache.image_class == k) & ~ctx.held, ctx.device)
        z, s, _ = model_parts(model, torch.from_numpy(probe.features[name].astype(np.float32)).to(ctx.device))
        z, s = z.cpu(), s.cpu()
        d = bank.score(z.reshape(-1, z.shape[-1])).reshape(s.shape)
        refs = reference(s[normal]), reference(d[normal])
        pixel = {w: ctx.probe_class(_combined(w, refs, s, d), masks)["pixel"] for w in weights}
        measured[k] = {"held": int((ctx.held & (cache.image_class == k)).sum()), "refs": refs, "pixel": pixel,
                       "bank": bank}
    chosen = _choose(measured, mode, min_images, pool)
    n = ctx.n_labels
    a, b, c = np.ones(n), np.zeros(n), np.zeros(n)
    banks: dict[int, MemoryBank] = {}
    choices = []
    for k, m in measured.items():
        w, basis = chosen[k]
        a[k], b[k], c[k] = mix_coefficients(w, *m["refs"])
        if w > 0:
            banks[k] = m["bank"]
        name = cache.class_names[k]
        choices.append({"class": name, "held_out": m["held"], "weight": w, "chosen_on": basis,
                        "probe_pixel": {str(x): round(float(v), 4) for x, v in m["pixel"].items()}})
        ctx.log(f"train: score mix: {name} ({m['held']} held-out images): probe pixel "
                + ", ".join(f"w={x:g} {v:.4f}" for x, v in m["pixel"].items()) + f" -> w={w:g} ({basis})")
    images = np.nonzero(np.isin(cache.image_class, sorted(banks)) & ~ctx.held)[0]
    return ScoreMix(a, b, c, images, choices), banks


def _combined(w: float, refs: tuple[tuple[float, float], tuple[float, float]], s: torch.Tensor,
              d: torch.Tensor) -> torch.Tensor:
    ca, cb, cc = mix_coefficients(w, *refs)
    return ca * s + cb * d + cc


def _choose(measured: dict[int, dict[str, Any]], mode: str, min_images: int,
            pool: str = "mean") -> dict[int, tuple[float, str]]:
    """(weight, what chose it) per class: ``own`` probe, the ``pooled`` probe of the classes
    with fewer than ``min_images`` held-out images (``pool`` = mean: their mean metric; rank: their
    mean rank, the lowest wins, ties to the smaller weight), ``too few`` (s), or the ``forced`` weight."""
    if mode != "probe":
        return {k: (FORCED[mode], "forced") for k in measured}
    small = [k for k, m in measured.items() if m["held"] < min_images]
    pooled, basis = 0.0, "too few"
    if small and sum(measured[k]["held"] for k in small) >= min_images:
        if pool == "rank":
            ranks = mean_ranks([measured[k]["pixel"] for k in small])
            pooled = choose_weight({w: -r for w, r in ranks.items()})
        else:
            pooled = choose_weight({w: float(np.mean([measured[k]["pixel"][w] for k in small])) for w in WEIGHTS})
        basis = "pooled"
    return {k: (choose_weight(m["pixel"]), "own") if k not in small else (pooled, basis) for k, m in measured.items()}


def restore_banks(model: CladModel, mix: ScoreMix, cache: Any, device: torch.device) -> dict[int, MemoryBank]:
    """The banks of a loaded head, from its training cache (``mix.bank_images``)."""
    banks = {}
    for k in mix.mixed:
        images = np.zeros(len(cache.image_ids), bool)
        images[mix.bank_images] = True
        banks[k] = class_bank(model, cache, images & (cache.image_class == k), device)
    return banks


@torch.no_grad()
def cross_fitted_scores(model: CladModel, mix: ScoreMix, ctx: Any, folds: int) -> dict[int, np.ndarray]:
    """``{image: [H*W]}`` scores of every not-held-out training image of a mixed class, with d
    from a bank without its own fold's images (``stages.train.labels.calibration_folds``): in
    the deployed bank an image's own rows lie at distance 0, which would make the seen scores
    of a class that uses d a constant."""
    from stages.heads.knn import bank_rows
    from stages.train.labels import calibration_folds, normal_maps

    cache = ctx.cache
    fold = calibration_folds(cache, ctx.held, ctx.seed, folds)
    out: dict[int, np.ndarray] = {}
    for k in mix.mixed:
        own = (cache.image_class == k) & ~ctx.held
        rows, row_image = bank_rows(cache, own)
        z_rows = embed(model, rows, ctx.device)
        for f in range(folds):
            members = own & (fold == f)
            if not members.any():
                continue
            ctx.log(f"calibrate: {cache.class_names[k]}: cross-fitting d, fold {f + 1}/{folds} "
                    f"({int(members.sum())} images)")
            bank = MemoryBank(z_rows[~members[row_image]])
            for i, m in normal_maps(cache, members).items():
                z, s, _ = model_parts(model, torch.from_numpy(m[None].astype(np.float32)).to(ctx.device))
                d = bank.score(z.cpu().reshape(-1, z.shape[-1]))
                out[i] = (float(mix.a[k]) * s.cpu()[0] + float(mix.b[k]) * d + float(mix.c[k])).numpy()
    return out

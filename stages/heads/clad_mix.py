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
excluded), read from the cache when the head first scores. With
``score_mix_space`` contrastive or probe, d may be measured after the adaptor
the contrastive phase kept instead (round 9: fine-tuning moves the adaptor for
the discriminator's sake); the model keeps that second adaptor and which
classes use it (``CladModel.set_space``). A chosen bank may be cut to a greedy
coreset (``score_mix_coreset``, round 10). This module measures and applies;
``clad_choice`` holds the choosing itself, ``clad_bank`` the banks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stages.heads.clad_bank import class_rows, embed, reduce_bank
from stages.heads.clad_choice import (
    FORCED,
    SPACES,
    WEIGHTS,
    candidate_name,
    choose_per_class,
    mix_coefficients,
    reference,
)
from stages.heads.clad_model import Adaptor, CladModel
from stages.search import CORESET_BLOCK_ROWS, MemoryBank
from stages.train.probe import defective


@dataclass
class ScoreMix:
    """Per label (class): the coefficients of ``a s + b d + c`` ``[N]`` each, and the
    training images whose normal rows form the banks of the classes with ``b != 0``."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    bank_images: np.ndarray  # [M] int64 image indices of the cache
    choices: list[dict[str, Any]] = field(default_factory=list)  # per class: what the probe measured
    kept: dict[int, np.ndarray] = field(default_factory=dict)  # label -> coreset positions among its rows

    @property
    def mixed(self) -> list[int]:
        """Labels whose score uses d."""
        return [int(k) for k in np.nonzero(self.b)[0]]

    def state(self) -> dict[str, torch.Tensor]:
        out = {"a": torch.from_numpy(self.a), "b": torch.from_numpy(self.b), "c": torch.from_numpy(self.c),
               "bank_images": torch.from_numpy(self.bank_images.astype(np.int64))}
        if self.kept:  # flat, with each position's label (a checkpoint holds tensors)
            out["kept"] = torch.from_numpy(np.concatenate(list(self.kept.values())).astype(np.int64))
            out["kept_label"] = torch.cat([torch.full((len(v),), k, dtype=torch.int64) for k, v in self.kept.items()])
        return out

    @classmethod
    def from_state(cls, d: dict[str, torch.Tensor]) -> ScoreMix:
        kept = {}
        if "kept" in d:  # a head whose banks a coreset cut
            pos, label = d["kept"].numpy(), d["kept_label"].numpy()
            kept = {int(k): pos[label == k] for k in np.unique(label)}
        return cls(d["a"].numpy(), d["b"].numpy(), d["c"].numpy(), d["bank_images"].numpy(), kept=kept)


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


def contrastive_space(model: CladModel, ctx: Any) -> Adaptor | None:
    """A frozen copy of the adaptor the contrastive phase kept (``best_contrastive.pt``), for
    ``score_mix_space = contrastive``; None (d in the final adaptor, logged) where no phase-1
    model was kept.

    Why: fine-tuning trains the adaptor for the discriminator's score alone and moves the
    space the contrastive phase built; nearest-neighbour distances there outline defects
    better on the held-out probe (the seven-class model's bottle, probe AUPRO of d: 86.7 in
    the final adaptor, 91.3 in the contrastive one; docs/RESULTS.md, round 9)."""
    path = ctx.files.best("contrastive")
    if not path.is_file():
        ctx.log("train: score mix: no contrastive-phase model kept, so d in the final adaptor's space")
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    # with a weight average (ema > 0) the phase kept {net, ema}, and the average is what it scored
    prefix = next((p for p in ("ema.adaptor.", "adaptor.") if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        ctx.log(f"train: score mix: {path.name} holds no adaptor, so d in the final adaptor's space")
        return None
    space = copy.deepcopy(model.adaptor)
    space.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    ctx.log(f"train: score mix: d in the adaptor space of the contrastive phase ({path.name})")
    return space


def fit_mix(model: CladModel, mode: str, min_images: int, ctx: Any, pool: str = "mean",
            space: str = "final", coreset: float = 1.0,
            coreset_block: int = CORESET_BLOCK_ROWS) -> tuple[ScoreMix | None, dict[int, MemoryBank]]:
    """Choose each class's weight on the probe (``mode`` probe) or give every class with a probe
    ``FORCED[mode]``; the mix (``mixed`` empty where every class keeps s) and the banks of the
    classes that use d; ``(None, {})`` without a probe or class labels.

    With ``probe``, as the verdict calibration fits its shift (``stages.train.calibrate.seen_fit``):
    a class with at least ``min_images`` held-out images chooses on its own probe; the other
    classes choose one weight together where they hold that many held-out images between them (``pool``:
    on the mean of their probe metrics, or on their mean rank, each class one vote), and keep s otherwise.
    ``space`` (``score_mix_space``): d after the final adaptor, after ``model.space`` (the contrastive
    phase's adaptor, ``contrastive_space``) for every class, or (``probe``) the two spaces are candidates
    too, chosen as the weights are; ``model.space_classes`` records the result. ``coreset`` < 1
    (``score_mix_coreset``): each chosen bank is then cut to that fraction of its rows
    (``clad_bank.reduce_bank``; one selection per block of at most ``coreset_block`` rows,
    ``score_mix_coreset_block``), and its class's d measured anew against the cut bank for its
    coefficients. ``ctx``: the run's ``TrainContext``.
    """
    cache, probe = ctx.cache, ctx.probe_set()
    if probe is None:
        ctx.log("train: score mix: no held-out probe, so s alone")
        return None, {}
    if not np.array_equal(ctx.labels, cache.image_class):
        ctx.log("train: score mix: the labels are not the classes (data.labels = pseudo), so s alone")
        return None, {}
    second = model.space
    model.set_space(None)  # measured below in each space itself
    spaces = [0] if second is None or space == "final" else [1] if space == "contrastive" else [0, 1]
    nets = {0: model.adaptor, 1: second}
    weights = WEIGHTS if mode == "probe" else (FORCED[mode],)
    cands = [(0.0, 0)] * (mode == "probe") + [(w, sp) for sp in spaces for w in weights if w > 0]  # (weight, space)
    measured: dict[int, dict[str, Any]] = {}  # class -> held-out count, refs, probe pixel per candidate, banks
    for k, name in enumerate(cache.class_names):
        if name not in probe.features:
            continue
        masks = probe.masks[name]
        normal = torch.from_numpy(~defective(masks))
        x = torch.from_numpy(probe.features[name].astype(np.float32))
        z0, s, _ = model_parts(model, x.to(ctx.device))  # z0: after the adaptor (no space is set here)
        s = s.cpu()
        rows = class_rows(cache, (cache.image_class == k) & ~ctx.held)[0]
        banks, refs, zs = {}, {}, {}
        # in the candidates' order (ties go to the earlier): s alone needs no bank, then each space's
        pixel = {(0.0, 0): ctx.probe_class(s, masks)["pixel"]} if (0.0, 0) in cands else {}
        for sp in spaces:
            banks[sp] = MemoryBank(embed(model, rows, ctx.device, module=nets[sp]))
            zs[sp] = z0.cpu().reshape(-1, z0.shape[-1]) if sp == 0 else \
                torch.from_numpy(embed(model, x.reshape(-1, x.shape[-1]), ctx.device, module=nets[sp]))
            d = banks[sp].score(zs[sp]).reshape(s.shape)
            refs[sp] = reference(s[normal]), reference(d[normal])
            for w, c_sp in cands:
                if c_sp == sp and w > 0:
                    pixel[(w, sp)] = ctx.probe_class(_combined(w, refs[sp], s, d), masks)["pixel"]
        measured[k] = {"held": int((ctx.held & (cache.image_class == k)).sum()), "refs": refs, "pixel": pixel,
                       "banks": banks, "probe": (s, zs, masks, normal)}
    chosen = choose_per_class(measured, mode, min_images, pool)
    n = ctx.n_labels
    a, b, c = np.ones(n), np.zeros(n), np.zeros(n)
    banks_out: dict[int, MemoryBank] = {}
    choices, in_second, kept = [], [], {}
    for k, m in measured.items():
        (w, sp), basis = chosen[k]
        name = cache.class_names[k]
        choices.append({"class": name, "held_out": m["held"], "weight": w, "space": SPACES[sp],
                        "chosen_on": basis,
                        "probe_pixel": {candidate_name(x): round(float(v), 4) for x, v in m["pixel"].items()}})
        ctx.log(f"train: score mix: {name} ({m['held']} held-out images): probe pixel "
                + ", ".join(f"w={candidate_name(x)} {v:.4f}" for x, v in m["pixel"].items())
                + f" -> w={candidate_name((w, sp))} ({basis})")
        if w > 0:
            banks_out[k], refs = m["banks"][sp], m["refs"][sp]
            if coreset < 1:
                banks_out[k], kept[k], refs, cut = _cut(banks_out[k], w, m["probe"], sp, coreset, coreset_block, ctx)
                choices[-1]["coreset"] = {"rows": len(kept[k]), "of": len(m["banks"][sp].rows),
                                          "probe_pixel": round(float(cut), 4)}
                ctx.log(f"train: score mix: {name}: probe pixel with the coreset {cut:.4f} "
                        f"(whole bank {m['pixel'][(w, sp)]:.4f})")
            a[k], b[k], c[k] = mix_coefficients(w, *refs)
            in_second += [k] * (sp == 1)
    model.set_space(second if in_second else None, in_second)
    images = np.nonzero(np.isin(cache.image_class, sorted(banks_out)) & ~ctx.held)[0]
    return ScoreMix(a, b, c, images, choices, kept), banks_out


def _cut(bank: MemoryBank, w: float, probe: tuple[torch.Tensor, dict[int, torch.Tensor], np.ndarray, torch.Tensor],
         sp: int, fraction: float, block_rows: int, ctx: Any) -> tuple[MemoryBank, np.ndarray, tuple, float]:
    """The chosen bank cut by the coreset, its kept positions, the class's references (s, d) with d
    against the cut bank, and the probe pixel metric of the candidate with it."""
    s, zs, masks, normal = probe
    cut, kept = reduce_bank(bank, fraction, ctx.seed, ctx.device, ctx.log, block_rows)
    d = cut.score(zs[sp]).reshape(s.shape)
    refs = reference(s[normal]), reference(d[normal])
    return cut, kept, refs, ctx.probe_class(_combined(w, refs, s, d), masks)["pixel"]


def _combined(w: float, refs: tuple[tuple[float, float], tuple[float, float]], s: torch.Tensor,
              d: torch.Tensor) -> torch.Tensor:
    ca, cb, cc = mix_coefficients(w, *refs)
    return ca * s + cb * d + cc


@torch.no_grad()
def cross_fitted_scores(model: CladModel, mix: ScoreMix, ctx: Any, folds: int) -> dict[int, np.ndarray]:
    """``{image: [H*W]}`` scores of every not-held-out training image of a mixed class, with d
    from a bank without its own fold's images (``stages.train.labels.calibration_folds``): in
    the deployed bank an image's own rows lie at distance 0, which would make the seen scores
    of a class that uses d a constant. Where a coreset cut the bank, the fold's bank is the
    deployed coreset without the fold's rows (not a coreset of the rest chosen anew: that
    would cost a selection per fold); it is smaller than the deployed bank, so these scores
    err high, as the knn head's do."""
    from stages.train.labels import calibration_folds, normal_maps

    cache = ctx.cache
    fold = calibration_folds(cache, ctx.held, ctx.seed, folds)
    out: dict[int, np.ndarray] = {}
    for k in mix.mixed:
        own = (cache.image_class == k) & ~ctx.held
        rows, row_image = class_rows(cache, own, mix.kept.get(k))  # a coreset: its rows without the fold's
        z_rows = embed(model, rows, ctx.device, k)
        for f in range(folds):
            members = own & (fold == f)
            if not members.any():
                continue
            ctx.log(f"calibrate: {cache.class_names[k]}: cross-fitting d, fold {f + 1}/{folds} "
                    f"({int(members.sum())} images)")
            bank = MemoryBank(z_rows[~members[row_image]])
            for i, m in normal_maps(cache, members).items():
                _, s, _ = model_parts(model, torch.from_numpy(m[None].astype(np.float32)).to(ctx.device))
                d = bank.score(torch.from_numpy(embed(model, m, ctx.device, k)))
                out[i] = (float(mix.a[k]) * s.cpu()[0] + float(mix.b[k]) * d + float(mix.c[k])).numpy()
    return out

"""How CLAD's score mix chooses (pure): the coefficients of ``a s + b d + c``, the candidates
(a weight of d, and the space d is measured in), and the choice per class on the held-out
probe, alone or pooled with the other small classes (``stages.heads.clad_mix`` measures and
applies; docs/RESULTS.md, "CLAD that works", rounds 7-9)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

WEIGHTS = (0.0, 0.5, 1.0)  # the candidates: s alone, the blend, d alone
FORCED = {"blend": 0.5, "distance": 1.0}  # score_mix settings that give every class with a probe one weight
SPACES = ("final", "contrastive")  # where d is measured: after the kept adaptor, after the contrastive phase's


def mix_coefficients(weight: float, s_ref: tuple[float, float], d_ref: tuple[float, float]) -> tuple[float, ...]:
    """(a, b, c) of ``a s + b d + c`` for blend weight ``weight`` and the (mean, std) of s and d on
    the class's held-out normal patches; weight 0 gives (1, 0, 0): s unchanged."""
    if weight == 0:
        return 1.0, 0.0, 0.0
    (sm, ss), (dm, ds) = s_ref, d_ref
    a, b = (1 - weight) / max(ss, 1e-12), weight / max(ds, 1e-12)
    return a, b, -(a * sm + b * dm)


def choose_weight(pixel: dict[Any, float]) -> Any:
    """The candidate (a weight, or a (weight, space)) with the highest probe ``pixel`` metric (mean
    of pixel AUROC and AUPRO); ties go to the earlier key (s, the paper's scorer, first)."""
    order = {w: i for i, w in enumerate(pixel)}
    return max(pixel, key=lambda w: (pixel[w], -order[w]))


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


def candidate_name(candidate: tuple[float, int]) -> str:
    """``(weight, space)`` -> its name in the run's summary: ``0.5``, ``1.0@contrastive``, ..."""
    w, space = candidate
    return str(float(w)) if space == 0 else f"{float(w)}@{SPACES[space]}"


def choose_per_class(measured: dict[int, dict[str, Any]], mode: str, min_images: int,
                     pool: str = "mean") -> dict[int, tuple[Any, str]]:
    """(candidate, what chose it) per class, candidates being the keys of each class's ``pixel`` (the
    same for every class, in order of preference): ``own`` probe, the ``pooled`` probe of the classes
    with fewer than ``min_images`` held-out images (``pool`` = mean: their mean metric; rank: their
    mean rank, the lowest wins, ties to the earlier candidate), ``too few`` (the first candidate: s,
    or the forced weight), or ``forced`` where there is one candidate."""
    if not measured:
        return {}
    first = next(iter(next(iter(measured.values()))["pixel"]))
    if mode != "probe" and len(next(iter(measured.values()))["pixel"]) == 1:
        return {k: (first, "forced") for k in measured}
    small = [k for k, m in measured.items() if m["held"] < min_images]
    pooled, basis = first, "too few"
    if small and sum(measured[k]["held"] for k in small) >= min_images:
        if pool == "rank":
            ranks = mean_ranks([measured[k]["pixel"] for k in small])
            pooled = choose_weight({w: -r for w, r in ranks.items()})
        else:
            pooled = choose_weight({w: float(np.mean([measured[k]["pixel"][w] for k in small]))
                                    for w in measured[small[0]]["pixel"]})
        basis = "pooled"
    return {k: (choose_weight(m["pixel"]), "own") if k not in small else (pooled, basis) for k, m in measured.items()}

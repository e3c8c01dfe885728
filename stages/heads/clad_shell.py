"""CLAD's GAS shell: its radius per class from nearest-neighbour distances, and
the adaptive factor that keeps it as tight as the discriminator can still learn.

GAS rows lie on a shell ``[r1, 2 r1]`` around normal rows, r1 = factor x the
class's median nearest-neighbour distance (``class_nn_distances``). The
shell's inner radius is the boundary the discriminator learns: a tighter shell
makes it sensitive to smaller departures from the normal rows (MVTec transistor
alone, 1 + 8 epochs: factor 0.5 gave 98.0 image / 96.7 pixel AUROC against 95.1
/ 93.8 at 1.0), until the rows are too close to tell apart in the training
budget (factor 0.25 there: the classification and hinge losses stalled at 0.49 /
0.27 and the probe fell from 0.93 to 0.88). Where that limit lies depends on the
class and on the model: in one seven-class model at factor 0.5 the GAS rows of
bottle and weave stayed inseparable from their normal rows (held-out GAS AUROC
0.55) while transistor alone learned them (0.97).

So, with ``gas_shell = adaptive``, each class starts at the configured radius
and after every epoch its held-out normal rows are scored against GAS rows made
from them (``class_gas_auroc``, training data only): a class whose GAS rows are
separated (AUROC >= ``target``) gets a tighter shell, one whose rows are not
(AUROC < ``target - LOOSEN_BELOW``) a looser one, within ``[SHELL_MIN, 1]`` of
the configured radius (``update_shell``). It is GLASS's gradient ascent (GAS rows
made as hard as the discriminator allows) done with the radius, per class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from cache.stream import TrainCache
from core.files import seeded
from stages.train.losses import project_shell

SHELL_STEP = 0.8  # a shell's factor is multiplied (tighter) or divided (looser) by this per epoch
SHELL_MIN = 0.5  # the tightest shell, a fraction of the configured radius (0.25 did not train on transistor)
LOOSEN_BELOW = 0.05  # a shell is loosened when its AUROC is this far below the target


# -- radii from nearest-neighbour distances (training normals against held-out ones) ------
def _bank(cache: TrainCache, held: np.ndarray, order: Any, n_bank: int) -> torch.Tensor:
    """Up to ``n_bank`` training normal rows ``[n, C]`` (float32), read from shards in ``order``."""
    bank, rows = [], 0
    for part in cache.normal_parts(held, order):
        bank.append(part)
        rows += len(part)
        if rows >= n_bank:
            break
    return torch.from_numpy(np.concatenate(bank, dtype=np.float32)[:n_bank])


def median_nn_distance(cache: TrainCache, held: np.ndarray, probe: np.ndarray, seed: int,
                       n_probe: int = 2000, n_bank: int = 50000, shards: np.ndarray | None = None) -> float:
    """Median distance of held-out normal rows ``probe`` to their nearest
    training normal row (of ``shards`` only, default all, in a seeded order)."""
    from stages.search import nearest_rows

    order = seeded(seed, "nn-bank").permutation(cache.n_shards) if shards is None else shards
    x = _bank(cache, held, order, n_bank)
    q = torch.from_numpy(probe[seeded(seed, "nn-probe").permutation(len(probe))[:n_probe]].astype(np.float32))
    dist, _ = nearest_rows(q, x, (x * x).sum(1))
    return float(dist[:, 0].median())


def image_max_statistic(per_image: list[np.ndarray]) -> float:
    """Median over images of each image's largest patch distance (``per_image``: one
    ``[rows]`` array of NN distances per held-out image): where a typical normal
    image's worst patch lies, i.e. what its max image score sees."""
    return float(np.median([float(np.max(d)) for d in per_image]))


def image_max_nn_distance(cache: TrainCache, held: np.ndarray, maps: dict[int, np.ndarray], seed: int,
                          shards: np.ndarray, n_bank: int = 50000) -> float:
    """``image_max_statistic`` of held-out images ``maps`` (image -> ``[rows, C]``)
    against up to ``n_bank`` training rows of ``shards`` (the bank ``median_nn_distance`` reads)."""
    from stages.search import nearest_rows

    x = _bank(cache, held, shards, n_bank)
    xx = (x * x).sum(1)
    return image_max_statistic([nearest_rows(torch.from_numpy(m.astype(np.float32)), x, xx)[0][:, 0].numpy()
                                for m in maps.values()])


def class_nn_distances(cache: TrainCache, held: np.ndarray, seed: int, stat: str = "median") -> np.ndarray:
    """``[n_classes]`` per class, a statistic of its held-out normal rows' distances
    to that class's training rows (NaN for a class without held-out images):
    ``median`` over rows, or ``image_max`` (``image_max_statistic``).

    GLASS sets its GAS radius per class; one radius for all classes puts the
    synthetic shell inside the normal spread of a coarse class and far
    outside a fine one. Only the shards holding the class's images are read,
    and only the class's own training rows form the bank: shards are cut by
    image count, so one shard may end one class and start the next (until
    2026-12-04 the bank was every row of the shards a class starts, which
    mixed in the next class's first images and failed for a class that starts
    no shard, e.g. 8 images a class in 16-image shards).
    """
    from stages.train.labels import normal_maps

    out = np.full(len(cache.class_names), np.nan)
    for c in range(len(cache.class_names)):
        sel = held & (cache.image_class == c)
        if not sel.any():
            continue
        maps = normal_maps(cache, sel)
        own = cache.image_class == c
        holding = [s for s in range(cache.n_shards) if own[cache.image_offsets[s]:cache.image_offsets[s + 1]].any()]
        shards = seeded(seed, "nn-bank", c).permutation(np.array(holding, dtype=np.int64))
        excluded = held | ~own  # the bank: this class's training rows only
        if stat == "image_max":
            out[c] = image_max_nn_distance(cache, excluded, maps, seed, shards)
        else:
            out[c] = median_nn_distance(cache, excluded, np.concatenate(list(maps.values())), seed, shards=shards)
    return out


# -- the adaptive factor -------------------------------------------------------------
def update_shell(shell: np.ndarray, auroc: np.ndarray, target: float, step: float = SHELL_STEP,
                 low: float = SHELL_MIN) -> np.ndarray:
    """Next epoch's shell factors ``[n_classes]``: times ``step`` where ``auroc`` >= ``target``
    (not below ``low``), divided by it where ``auroc`` < ``target - LOOSEN_BELOW`` (not above 1),
    unchanged in between and where ``auroc`` is NaN (a class without held-out rows)."""
    out = shell.astype(np.float64).copy()
    tighter = auroc >= target
    looser = auroc < target - LOOSEN_BELOW
    out[tighter] = np.maximum(out[tighter] * step, low)
    out[looser] = np.minimum(out[looser] / step, 1.0)
    return out


def rows_per_class(per_image: dict[int, np.ndarray], image_class: np.ndarray, n_classes: int, limit: int,
                   rng: np.random.Generator) -> dict[int, torch.Tensor]:
    """Held-out normal rows grouped by class, at most ``limit`` a class (a seeded choice):
    ``per_image`` maps an image index to its ``[rows, C]`` normal rows."""
    out: dict[int, torch.Tensor] = {}
    for c in range(n_classes):
        parts = [m for i, m in sorted(per_image.items()) if image_class[i] == c]
        if not parts:
            continue
        x = np.concatenate(parts)
        if len(x) > limit:
            x = x[np.sort(rng.choice(len(x), limit, replace=False))]
        out[c] = torch.from_numpy(x.astype(np.float32))
    return out


@torch.no_grad()
def class_gas_auroc(score: Callable[[torch.Tensor], torch.Tensor], rows: dict[int, torch.Tensor],
                    r1: torch.Tensor, n_classes: int, seed: int) -> np.ndarray:
    """``[n_classes]`` AUROC of ``score`` (rows -> anomaly scores, high = anomalous) separating
    each class's held-out normal ``rows`` from GAS rows made from them: Gaussian noise of
    expected norm ``r1[c]`` projected onto ``[r1[c], 2 r1[c]]`` (no ascent). NaN for a
    class without rows. The noise comes from its own generator: training's is untouched."""
    from stages.metrics import auroc  # here: it imports scikit-learn, ~1.5 s for every clad command

    out = np.full(n_classes, np.nan)
    gen = torch.Generator().manual_seed(seed)
    for c, x in rows.items():
        r = float(r1[c])
        noise = torch.randn(x.shape, generator=gen) * (r / x.shape[1] ** 0.5)
        g = project_shell(x + noise, x, r, 2 * r)
        s = torch.cat([score(x), score(g)]).cpu().numpy()
        out[c] = auroc(np.r_[np.zeros(len(x)), np.ones(len(g))], s)
    return out

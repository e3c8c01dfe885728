"""CLAD's adaptive GAS shell: per class, as tight as the discriminator can still learn.

GAS rows lie on a shell ``[r1, 2 r1]`` around normal rows, r1 = factor x the
class's median nearest-neighbour distance (``clad.class_nn_distances``). The
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

import numpy as np
import torch

from stages.train.losses import project_shell

SHELL_STEP = 0.8  # a shell's factor is multiplied (tighter) or divided (looser) by this per epoch
SHELL_MIN = 0.5  # the tightest shell, a fraction of the configured radius (0.25 did not train on transistor)
LOOSEN_BELOW = 0.05  # a shell is loosened when its AUROC is this far below the target


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
    from sklearn.metrics import roc_auc_score

    out = np.full(n_classes, np.nan)
    gen = torch.Generator().manual_seed(seed)
    for c, x in rows.items():
        r = float(r1[c])
        noise = torch.randn(x.shape, generator=gen) * (r / x.shape[1] ** 0.5)
        g = project_shell(x + noise, x, r, 2 * r)
        s = torch.cat([score(x), score(g)]).cpu().numpy()
        out[c] = roc_auc_score(np.r_[np.zeros(len(x)), np.ones(len(g))], s)
    return out

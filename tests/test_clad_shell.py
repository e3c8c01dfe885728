"""The adaptive GAS shell (stages/heads/clad_shell.py) on hand-built cases."""

from __future__ import annotations

import numpy as np
import torch

from stages.heads.clad_shell import LOOSEN_BELOW, SHELL_MIN, class_gas_auroc, rows_per_class, update_shell


def test_update_shell_tightens_separated_classes_loosens_the_others_within_bounds():
    shell = np.array([1.0, 1.0, 0.6, 0.55, 0.8, 1.0])
    auroc = np.array([0.99, 0.5, 0.97, 0.96, 0.92, np.nan])
    got = update_shell(shell, auroc, target=0.95, step=0.8)
    # 1.0 * 0.8; loosened but capped at 1; 0.6 * 0.8 = 0.48 floored at SHELL_MIN; same; inside the band; no rows
    assert np.allclose(got, [0.8, 1.0, SHELL_MIN, SHELL_MIN, 0.8, 1.0])
    assert np.isclose(update_shell(np.array([0.64]), np.array([0.95 - LOOSEN_BELOW - 0.01]), 0.95, 0.8)[0], 0.8)
    assert update_shell(np.array([0.64]), np.array([0.95 - LOOSEN_BELOW]), 0.95, 0.8)[0] == 0.64
    # gas_shell_min: another floor
    assert np.isclose(update_shell(np.array([0.4]), np.array([0.99]), 0.95, 0.8, low=0.3)[0], 0.32)
    assert update_shell(np.array([0.4]), np.array([0.99]), 0.95, 0.8, low=0.35)[0] == 0.35


def test_class_gas_auroc_is_one_for_a_distance_score_and_one_half_for_a_blind_one():
    """Normal rows of class 0 and 2 (class 1 has none): a score that is the distance
    to the nearest normal row puts every GAS row (at >= r1 from its own row, and the
    rows 100 apart) above every normal row (0); a constant score cannot separate."""
    x0 = torch.arange(20, dtype=torch.float32)[:, None] * 100 * torch.ones(1, 8)
    x2 = x0 + 7
    bank = torch.cat([x0, x2])

    def dist(q: torch.Tensor) -> torch.Tensor:
        return (q[:, None] - bank[None]).norm(dim=2).min(1).values  # exact: 0 for a normal row

    r1 = torch.tensor([2.0, 5.0, 3.0])
    auc = class_gas_auroc(dist, {0: x0, 2: x2}, r1, 3, seed=0)
    assert auc[0] == 1.0 and auc[2] == 1.0 and np.isnan(auc[1])
    flat = class_gas_auroc(lambda q: torch.zeros(len(q)), {0: x0}, r1, 3, seed=0)
    assert flat[0] == 0.5
    # its own generator: the global RNG is untouched, and the same seed gives the same value
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    class_gas_auroc(dist, {0: x0}, r1, 3, seed=0)
    assert torch.equal(torch.rand(1), before)


def test_rows_per_class_groups_held_out_images_by_class_and_caps_them():
    per_image = {0: np.zeros((4, 2), np.float16), 3: np.ones((4, 2), np.float16), 5: np.full((4, 2), 2, np.float16)}
    image_class = np.array([0, 0, 0, 1, 1, 0])
    rows = rows_per_class(per_image, image_class, 3, limit=6, rng=np.random.default_rng(0))
    assert sorted(rows) == [0, 1]
    assert rows[0].shape == (6, 2) and set(rows[0][:, 0].tolist()) <= {0.0, 2.0}
    assert rows[1].shape == (4, 2) and (rows[1] == 1).all()

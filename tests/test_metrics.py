"""Metrics on hand-built maps with known answers, against sklearn and a reference AUPRO."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from stages.metrics import area_to, aupro, aupro_ader, auroc, class_metrics, f1_max, pro_curve


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 5000)
    s = np.round(rng.random(5000) + 0.3 * y, 2).astype(np.float32)  # many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert np.isnan(auroc([1, 1], [0.2, 0.3]))


def test_f1_max_hand_case():
    f1, th = f1_max(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.5, 0.9]))
    # threshold 0.5: TP 2, FP 1 -> P 2/3, R 1 -> F1 0.8
    assert f1 == pytest.approx(0.8) and th == pytest.approx(0.5)


def test_aupro_perfect_and_hand_built():
    masks = np.zeros((1, 4, 4), np.uint8)
    masks[0, :2, :2] = 1
    perfect = masks.astype(np.float32)
    assert aupro(perfect, masks) == pytest.approx(1.0)
    # region pixels score 0.5; one normal pixel scores 1.0 (FPR 1/12 before the region is found)
    maps = np.zeros((1, 4, 4), np.float32)
    maps[0, :2, :2] = 0.5
    maps[0, 3, 3] = 1.0
    fpr, pro = pro_curve(maps, masks)
    assert fpr.tolist() == pytest.approx([0, 1 / 12, 1 / 12, 1.0])
    assert pro.tolist() == pytest.approx([0, 0, 1, 1])
    # area to 0.3: 0 on [0, 1/12], then 1 until 0.3 -> (0.3 - 1/12) / 0.3
    assert aupro(maps, masks) == pytest.approx((0.3 - 1 / 12) / 0.3)


def _reference_aupro(maps, masks, limit=0.3):
    """Straightforward: every distinct threshold, binary maps, regions, then the area."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = ~masks.astype(bool)
    pts = [(0.0, 0.0)]
    for th in np.unique(maps)[::-1]:
        pred = maps >= th
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([pred[i][r].mean() for i, r in regions])
        pts.append((fpr, pro))
    x, y = np.array(pts).T
    return area_to(x, y, limit) / limit


def test_aupro_matches_reference_on_random_maps():
    rng = np.random.default_rng(1)
    masks = np.zeros((3, 24, 24), np.uint8)
    masks[0, 2:6, 3:9] = 1
    masks[0, 15:20, 15:17] = 1  # two regions in one image
    masks[1, 10:14, 10:14] = 1
    maps = (rng.random((3, 24, 24)) + masks * rng.random((3, 24, 24))).astype(np.float32)
    maps = np.round(maps, 3)  # ties too
    assert aupro(maps, masks) == pytest.approx(_reference_aupro(maps, masks), abs=1e-6)
    assert 0 < aupro_ader(maps, masks) <= 1


def test_class_metrics_keys_and_values():
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[1, 2:4, 2:4] = 1
    maps = masks.astype(np.float32) * 2 + 0.1
    m = class_metrics(np.array([0, 1]), maps.reshape(2, -1).max(1), maps, masks)
    assert m["image_auroc"] == 1.0 and m["pixel_auroc"] == 1.0 and m["aupro"] == pytest.approx(1.0)

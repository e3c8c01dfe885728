"""Detection and localisation metrics (pure numpy; exact unless stated).

All pixel metrics are computed per class, so memory is bounded by the
largest class's test set, never by the whole data set; the mean is taken
over classes.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact AUROC by the rank-sum (Mann-Whitney U) with ties averaged.

    Works on float32 scores of any length without the float64 copy that
    sklearn makes; NaN when only one class is present.
    """
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    # average rank of each tie group (1-based)
    boundaries = np.flatnonzero(np.diff(s_sorted)) + 1
    starts = np.r_[0, boundaries]
    ends = np.r_[boundaries, s.size]
    avg_rank = (starts + ends + 1) / 2.0
    group = np.repeat(np.arange(len(starts)), ends - starts)
    pos_in_sorted = y[order]
    rank_sum = float(np.bincount(group, weights=pos_in_sorted, minlength=len(starts)) @ avg_rank)
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over thresholds and the threshold that reaches it."""
    p, r, t = precision_recall_curve(labels, scores)
    f1 = 2 * p * r / np.maximum(p + r, 1e-12)
    i = int(np.argmax(f1[:-1])) if len(t) else 0
    return float(f1[i]), float(t[i]) if len(t) else float("nan")


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    y = np.asarray(labels).ravel()
    if y.min() == y.max():
        return float("nan")
    return float(average_precision_score(y, np.asarray(scores).ravel()))


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve (MVTec AD definition): FPR and mean per-region overlap
    at every distinct threshold, from the highest score down.

    Regions are the 8-connected components of each ground-truth mask; every
    region weighs the same; FPR is over all normal pixels of the set.
    """
    maps = np.asarray(maps, np.float32)
    masks = np.asarray(masks).astype(bool)
    fp_change = np.zeros(maps.shape, np.float64)
    pro_change = np.zeros(maps.shape, np.float64)
    n_ok = int((~masks).sum())
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3), int))
        for r in range(1, n + 1):
            regions.append((i, lab == r))
    if n_ok:
        fp_change[~masks] = 1.0 / n_ok
    for i, region in regions:
        pro_change[i][region] = 1.0 / (len(regions) * region.sum())
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    scores = maps.ravel()[order]
    fpr = np.cumsum(fp_change.ravel()[order])
    pro = np.cumsum(pro_change.ravel()[order])
    keep = np.r_[np.diff(scores) != 0, True]  # last index of each threshold
    return np.r_[0.0, np.clip(fpr[keep], 0, 1)], np.r_[0.0, np.clip(pro[keep], 0, 1)]


def area_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) from 0 to x_max, interpolating at x_max."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if xs[-1] < x_max and inside.sum() < len(x):
        j = int(np.argmax(~inside))
        yj = y[j - 1] + (y[j] - y[j - 1]) * (x_max - x[j - 1]) / (x[j] - x[j - 1])
        xs, ys = np.r_[xs, x_max], np.r_[ys, yj]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec: / 0.3)."""
    if not np.asarray(masks).any():
        return float("nan")
    fpr, pro = pro_curve(maps, masks)
    return area_to(fpr, pro, fpr_limit) / fpr_limit


def aupro_ader(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, steps: int = 200) -> float:
    """The ADer/GLASS variant: 200 even thresholds, FPR < limit rescaled to [0, 1]."""
    maps = np.asarray(maps, np.float32)
    masks = np.asarray(masks).astype(bool)
    if not masks.any():
        return float("nan")
    normal = np.sort(maps[~masks])
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3), int))
        regions += [np.sort(maps[i][lab == r]) for r in range(1, n + 1)]
    thresholds = np.linspace(maps.min(), maps.max(), steps)
    # count of values > th via searchsorted on sorted arrays (same as (maps > th).sum())
    fprs = [(len(normal) - np.searchsorted(normal, th, side="right")) / len(normal) for th in thresholds]
    pros = [np.mean([(len(r) - np.searchsorted(r, th, side="right")) / len(r) for r in regions])
            for th in thresholds]
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < fpr_limit
    if keep.sum() < 2:
        return float("nan")
    f, p = fprs[keep], pros[keep]
    f = (f - f.min()) / max(f.max() - f.min(), 1e-12)
    order = np.argsort(f)
    return float(np.trapezoid(p[order], f[order]))


def class_metrics(image_labels: np.ndarray, image_scores: np.ndarray, maps: np.ndarray,
                  masks: np.ndarray, fpr_limit: float = 0.3) -> dict[str, float]:
    """Every metric for one class."""
    f1, th = f1_max(image_labels, image_scores) if image_labels.min() != image_labels.max() else (
        float("nan"), float("nan"))
    return {
        "image_auroc": auroc(image_labels, image_scores),
        "image_ap": average_precision(image_labels, image_scores),
        "image_f1_max": f1,
        "f1_threshold": th,
        "pixel_auroc": auroc(masks, maps),
        "pixel_ap": average_precision(masks, maps),
        "aupro": aupro(maps, masks, fpr_limit),
        "aupro_ader": aupro_ader(maps, masks, fpr_limit),
    }


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


def verdict_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Quality of yes/no verdicts ``score > threshold`` against image labels (1 = defective).

    recall = flagged defective / defective, false_alarm = flagged normal / normal,
    precision = flagged defective / flagged, f1 = harmonic mean of precision and
    recall (0 when nothing is flagged); NaN where a denominator is empty.
    """
    labels = np.asarray(labels).astype(bool)
    flagged = np.asarray(scores) > threshold if np.isfinite(threshold) else np.zeros(len(labels), bool)
    tp = int((flagged & labels).sum())
    fp = int((flagged & ~labels).sum())
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    recall = tp / n_pos if n_pos else float("nan")
    precision = tp / (tp + fp) if tp + fp else (0.0 if n_pos else float("nan"))
    f1 = 2 * precision * recall / (precision + recall) if n_pos and precision + recall > 0 else (
        0.0 if n_pos else float("nan"))
    return {"verdict_recall": recall, "verdict_false_alarm": fp / n_neg if n_neg else float("nan"),
            "verdict_precision": precision, "verdict_f1": f1}

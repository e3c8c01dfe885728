"""Pictures for people: heat-map overlays, ROC and PRO curves (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from core.files import write_with  # noqa: E402
from stages.metrics import pro_curve, roc_points  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    """``fig`` as ``path`` (the format from its suffix), written atomically; the figure is closed."""
    try:
        write_with(path, lambda fh: fig.savefig(fh, format=path.suffix.lstrip("."), dpi=90, bbox_inches="tight"))
    finally:
        plt.close(fig)


def overlay(image: np.ndarray, amap: np.ndarray, path: Path, title: str, mask: np.ndarray | None = None,
            vmin: float | None = None, vmax: float | None = None) -> None:
    """Image | image with heat map and ground-truth contour, side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    axes[1].imshow(image)
    im = axes[1].imshow(amap, cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
    if mask is not None and mask.any():
        axes[1].contour(mask, levels=[0.5], colors="white", linewidths=1.2)
    axes[1].set_title("anomaly map" + (" + ground truth" if mask is not None and mask.any() else ""),
                      fontsize=9)
    for a in axes:
        a.axis("off")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def curves(name: str, labels: np.ndarray, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray,
           path: Path, fpr_limit: float = 0.3) -> None:
    """Image ROC, pixel ROC (subsampled for drawing) and the PRO curve of one class."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    if labels.min() != labels.max():
        f, t = roc_points(labels, scores)
        axes[0].plot(f, t)
    axes[0].set_title(f"{name}: image ROC", fontsize=9)
    if masks.any():
        rng = np.random.default_rng(0)
        idx = rng.choice(masks.size, min(masks.size, 400_000), replace=False)
        f, t = roc_points(masks.ravel()[idx], maps.ravel()[idx])
        axes[1].plot(f, t)
        fpr, pro = pro_curve(maps, masks)
        axes[2].plot(fpr, pro)
        axes[2].axvline(fpr_limit, color="grey", ls="--", lw=0.8)
        axes[2].set_xlim(0, min(1.0, 3 * fpr_limit))
    axes[1].set_title(f"{name}: pixel ROC (400k px sample)", fontsize=9)
    axes[2].set_title(f"{name}: PRO curve", fontsize=9)
    for a, (xl, yl) in zip(axes, [("FPR", "TPR"), ("FPR", "TPR"), ("FPR", "PRO")], strict=True):
        a.set_xlabel(xl)
        a.set_ylabel(yl)
        a.plot([0, 1], [0, 1], color="lightgrey", lw=0.8)
        a.set_ylim(0, 1.02)
    _save(fig, path)


def score_histogram(name: str, labels: np.ndarray, scores: np.ndarray, threshold: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 3))
    bins = np.linspace(scores.min(), scores.max(), 30)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="normal")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="defective")
    if np.isfinite(threshold):
        ax.axvline(threshold, color="k", ls="--", lw=1, label="threshold")
    ax.set_title(f"{name}: image scores", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def score_strips(per_class: dict[str, dict], path: Path) -> None:
    """One row per class: normal (o) and defective (x) image scores, each
    class scaled so its threshold sits at 0 and its score range spans the row;
    the threshold is the vertical line. Where a person sees at once which
    classes the verdicts get wrong."""
    names = list(per_class)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    for row, name in enumerate(names):
        d = per_class[name]
        s, y, thr = np.asarray(d["scores"], float), np.asarray(d["labels"], bool), float(d["threshold"])
        if not len(s):
            continue
        ref = thr if np.isfinite(thr) else float(np.median(s))
        span = max(float(np.abs(s - ref).max()), 1e-9)
        x = (s - ref) / span
        jitter = (np.random.default_rng(row).random(len(s)) - 0.5) * 0.3
        ax.scatter(x[~y], row + jitter[~y], marker="o", s=14, facecolors="none", edgecolors="tab:blue",
                   label="normal" if row == 0 else None)
        ax.scatter(x[y], row + jitter[y], marker="x", s=14, color="tab:red", label="defective" if row == 0 else None)
    ax.axvline(0, color="k", lw=1, ls="--", label="class threshold")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("image score, per class: (score - threshold) / largest distance from it")
    ax.set_xlim(-1.05, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("verdicts per class: right of the line = flagged anomalous", fontsize=9)
    _save(fig, path)

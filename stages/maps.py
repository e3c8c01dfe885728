"""From per-patch scores to pixel anomaly maps and image scores (shared by
evaluation, scoring and threshold calibration)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def anomaly_maps(scores: torch.Tensor | np.ndarray, size: int, sigma: float = 4.0) -> np.ndarray:
    """``[n, h*w]`` patch scores -> ``[n, size, size]`` float32 maps.

    Bilinear upsampling (align_corners=False) to the evaluation size, then a
    Gaussian of ``sigma`` pixels (truncate 4), as GLASS/SimpleNet do.
    """
    s = torch.as_tensor(scores, dtype=torch.float32)
    side = int(round(s.shape[1] ** 0.5))
    up = F.interpolate(s.view(-1, 1, side, side), size=(size, size), mode="bilinear",
                       align_corners=False)[:, 0].cpu().numpy()
    if sigma > 0:
        up = np.stack([ndimage.gaussian_filter(m, sigma, truncate=4.0) for m in up])
    return up.astype(np.float32)


def image_scores(maps: np.ndarray) -> np.ndarray:
    """Image score = max of its map (the paper's rule)."""
    return maps.reshape(len(maps), -1).max(axis=1)

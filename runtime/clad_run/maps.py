"""Patch scores -> pixel anomaly maps in numpy: what ``stages.maps`` computes with torch and scipy.

Bilinear upsampling as ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)`` and a Gaussian as ``scipy.ndimage.gaussian_filter``
(``truncate`` 4, mode "reflect": the edge sample repeated), written as small
matrices and shifted sums.
"""

from __future__ import annotations

import numpy as np


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` float64: 1-D linear interpolation with align_corners=False (torch's rule:
    source ``(i + 0.5) * n_in / n_out - 0.5`` clamped at 0, the right neighbour clamped at the edge)."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    a = np.zeros((n_out, n_in))
    a[np.arange(n_out), i0] += 1 - lam
    a[np.arange(n_out), i1] += lam
    return a


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy's 1-D Gaussian: radius ``int(truncate * sigma + 0.5)``, normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur_axis(x: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    r = len(k) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    p = np.pad(x, pad, mode="symmetric")  # numpy's symmetric == scipy's reflect (d c b a | a b c d)
    n = x.shape[axis]
    out = np.zeros_like(x)
    for i, w in enumerate(k):
        out += w * np.take(p, np.arange(i, i + n), axis=axis)
    return out


def gaussian_blur(maps: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """``[n, H, W]`` -> the same blurred along H and W (float64 inside)."""
    k = gaussian_kernel(sigma, truncate)
    x = maps.astype(np.float64)
    return _blur_axis(_blur_axis(x, k, 1), k, 2)


def anomaly_maps(scores: np.ndarray, size: int, sigma: float = 4.0) -> np.ndarray:
    """``[n, h*w]`` patch scores -> ``[n, size, size]`` float32 maps (bilinear to ``size``, then Gaussian)."""
    s = np.asarray(scores, np.float64)
    side = int(round(s.shape[1] ** 0.5))
    a = bilinear_matrix(side, size)
    up = np.einsum("oi,nij,pj->nop", a, s.reshape(-1, side, side), a)
    if sigma > 0:
        up = gaussian_blur(up, sigma)
    return up.astype(np.float32)


def image_scores(maps: np.ndarray) -> np.ndarray:
    """Image score = max of its map."""
    return maps.reshape(len(maps), -1).max(axis=1)

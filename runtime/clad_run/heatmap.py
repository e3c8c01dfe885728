"""Heat-map pictures with pillow: the image and the image under its anomaly map, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def jet(v: np.ndarray) -> np.ndarray:
    """``[H, W]`` values in [0, 1] -> ``[H, W, 3]`` float RGB (matplotlib's jet, piecewise linear)."""
    v = np.clip(v, 0, 1)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], -1)


def save_overlay(image: np.ndarray, amap: np.ndarray, path: Path, title: str, vmin: float, vmax: float) -> None:
    """``image`` ``[S, S, 3]`` in [0, 1], ``amap`` ``[S, S]`` scaled to [vmin, vmax]; written as PNG."""
    span = vmax - vmin if vmax > vmin else 1.0
    heat = 0.5 * image + 0.5 * jet((amap - vmin) / span)
    s = image.shape[0]
    pic = np.concatenate([image, np.ones((s, 8, 3)), heat], 1)
    canvas = Image.new("RGB", (pic.shape[1], s + 16), "white")
    canvas.paste(Image.fromarray(np.round(pic * 255).astype(np.uint8)), (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), title[:160], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)

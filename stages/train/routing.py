"""Which trained class an image belongs to: one rule for every head.

An image's descriptor is the mean of its patch features (``[C_d]``, the same
backbone features every head reads). A scored image goes to the class of its
nearest training image descriptor. Confidence compares that distance with the
nearest image of any other class. An image farther from its nearest class
than ``ood_factor`` times that class's own spread (a high quantile of the
leave-one-out nearest-neighbour distances among the class's training
images) fits no trained class: ``clad score`` reports it as out of
distribution, a verdict of its own that a line rejects, never "normal"
against a wrong class's threshold.

Why 2 x the spread (training-side evidence, the built-in set): with one
class left out of the training descriptors, its images lie at 2.6 to 12.9
times the nearest other class's spread; the classes' own normal test images
at 1.2 at most. A large defect moves an image's mean feature too (a broken
bottle reached 5.8 x), so such an image can also be reported as out of
distribution: rejected either way, never passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.search import pairwise

OOD = "out-of-distribution"


@dataclass(frozen=True)
class Route:
    """The routing decision for one image."""

    class_name: str  # the nearest class (the class it is judged as unless out of distribution)
    ood: bool  # fits no trained class: farther than the class's ood_limit
    confidence: float  # 1 - d_best / d_other_class in [0, 1]; 1 with a single class
    distance: float  # to the nearest training image descriptor
    ood_limit: float  # the nearest class's out-of-distribution distance


def class_distances(d: np.ndarray, image_class: np.ndarray, n_classes: int) -> np.ndarray:
    """The rule: ``[m]`` distances of one image's descriptor to ``m`` training image
    descriptors of classes ``image_class`` ``[m]`` -> ``[n_classes]`` distance to
    each class's nearest one (inf for a class with none). The image goes to the
    argmin; every head routes by it (``Router`` here, routed_knn's own bank)."""
    return np.array([d[image_class == c].min() if (image_class == c).any() else np.inf for c in range(n_classes)])


def class_spreads(desc: np.ndarray, cls: np.ndarray, n_classes: int, quantile: float) -> np.ndarray:
    """Per class: the ``quantile`` of leave-one-out nearest-neighbour distances
    among its training descriptors (NaN for a class of one image)."""
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        x = desc[cls == c]
        if len(x) < 2:
            continue
        d = pairwise(x, x)
        np.fill_diagonal(d, np.inf)
        out[c] = float(np.quantile(d.min(1), quantile))
    return out


class Router:
    """Nearest-descriptor routing with an out-of-distribution test."""

    def __init__(self, descriptors: np.ndarray, image_class: np.ndarray, class_names: list[str],
                 quantile: float = 0.99, ood_factor: float = 2.0):
        self.desc = descriptors.astype(np.float32)
        self.cls = image_class.astype(np.int64)
        self.names = list(class_names)
        self.quantile, self.ood_factor = quantile, ood_factor
        spread = class_spreads(self.desc, self.cls, len(self.names), quantile)
        fallback = np.nanmax(spread) if np.isfinite(spread).any() else np.inf
        self.ood_limit = ood_factor * np.where(np.isfinite(spread), spread, fallback)

    def route(self, descriptors: np.ndarray) -> list[Route]:
        """``[n, C]`` descriptors -> one ``Route`` per image."""
        d = pairwise(descriptors, self.desc)
        out = []
        for row in d:
            per_class = class_distances(row, self.cls, len(self.names))
            best = int(np.argmin(per_class))
            others = np.delete(per_class, best)
            conf = 1.0 if not len(others) or not np.isfinite(others.min()) else \
                float(1 - per_class[best] / max(others.min(), 1e-12))
            out.append(Route(self.names[best], bool(per_class[best] > self.ood_limit[best]), max(conf, 0.0),
                             float(per_class[best]), float(self.ood_limit[best])))
        return out

    def state(self) -> dict[str, Any]:
        import torch

        return {"descriptors": torch.from_numpy(self.desc), "image_class": torch.from_numpy(self.cls),
                "class_names": self.names, "quantile": self.quantile, "ood_factor": self.ood_factor}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Router:
        return cls(state["descriptors"].numpy(), state["image_class"].numpy(), list(state["class_names"]),
                   float(state["quantile"]), float(state["ood_factor"]))


def descriptors(maps: np.ndarray) -> np.ndarray:
    """``[n, H*W, C]`` patch features -> ``[n, C]`` float32 image descriptors (mean)."""
    return maps.astype(np.float32).mean(1)

"""The routed knn head's bank (``stages.heads.routed_knn``): its images described at
training, and their rows read one class at a time when images are scored.

The head keeps what it chose (bank image indices, their row offsets); the rows of one
class's bank images are read when an image of that class is scored: from the head's own
copy where it has one (older, self-contained checkpoints), else from the training cache
the run refers to. A held class also keeps its rows in the candidate search's space
(the principal axes), derived once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from cache.image_stream import cache_grid
from cache.stream import TrainCache
from core.errors import CladError
from stages.search import CELLS, cell_descriptors
from stages.train.labels import normal_maps

ALL = -1  # the group of a search over every class's images (route = false)


def describe_bank(cache: TrainCache, ids: np.ndarray, sizes: np.ndarray, offsets: np.ndarray, picked: np.ndarray,
                  with_cells: bool, log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """What the head keeps of its bank images ``ids`` (cache indices, ``sizes`` ``[n_cache]`` normal
    rows per image, ``offsets`` ``[n + 1]`` their rows in bank order), class by class (one class's
    maps held at a time): mean features ``[n, C]``, cell descriptors ``[n, CELLS^2, C]`` (or
    None) and the bank rows at the sorted positions ``picked`` ``[p, C]`` (the axes' sample)."""
    grid = cache_grid(cache)
    desc = np.zeros((len(ids), cache.embed_dim), np.float32)
    cells = np.zeros((len(ids), CELLS * CELLS, cache.embed_dim), np.float32) if with_cells else None
    sample = np.zeros((len(picked), cache.embed_dim), np.float32)
    position = {int(i): t for t, i in enumerate(ids)}
    in_bank = np.zeros(len(cache.image_ids), bool)
    in_bank[ids] = True
    for k, name in enumerate(cache.class_names):
        for i, m in normal_maps(cache, in_bank & (cache.image_class == k)).items():
            t = position[i]
            if len(m) != sizes[i]:
                raise CladError(f"{cache.store.path}: image {i} has {len(m)} normal rows, "
                                f"not {sizes[i]}; re-extract with 'clad extract WORK'")
            desc[t] = m.astype(np.float32).mean(0)
            if cells is not None:
                cells[t] = cell_descriptors(m, grid)
            lo, hi = np.searchsorted(picked, [offsets[t], offsets[t + 1]])
            sample[lo:hi] = m[picked[lo:hi] - offsets[t]]
        log(f"train: class {k + 1}/{len(cache.class_names)} ({name}) described")
    return desc, cells, sample


@dataclass
class ClassBank:
    """The rows of one class's bank images (or of all, group ``ALL``), held while its images are scored."""

    group: int  # class index, or ALL
    members: np.ndarray  # [n_k] bank positions of its images, ascending
    local: np.ndarray  # [n] bank position -> index in members (-1: not a member)
    rows: torch.Tensor  # [M_k, C] float32
    offsets: np.ndarray  # [n_k + 1]: rows of member t = rows[offsets[t]:offsets[t+1]]
    spaces: dict[bool, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # projected? -> (z, |z|^2)

    def space(self, axes: tuple[np.ndarray, np.ndarray] | None, projected: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The search space's ``[M_k, d]`` rows and ``[M_k]`` squared norms: the class's rows in
        the principal ``axes`` (mean, basis; derived once per class, not stored) or the rows themselves."""
        if projected not in self.spaces:
            z = (self.rows - torch.from_numpy(axes[0])) @ torch.from_numpy(axes[1]) if projected else self.rows
            self.spaces[projected] = (z, (z * z).sum(1))
        return self.spaces[projected]


def read_class_bank(group: int, desc_class: np.ndarray, offsets: np.ndarray, rows: np.ndarray | None,
                    image_ids: np.ndarray | None, cache: Callable[[], TrainCache] | None) -> ClassBank:
    """The bank images of class ``group`` (``desc_class`` ``[n]`` per bank image; ALL: every
    image) with their rows: from ``rows`` ``[M, C]`` (rows of bank image j at
    ``offsets[j]:offsets[j+1]``) where given, else read from ``cache()`` (``image_ids`` ``[n]``:
    each bank image's index in the cache, checked against the offsets)."""
    members = np.arange(len(desc_class)) if group == ALL else np.nonzero(desc_class == group)[0]
    sizes = offsets[members + 1] - offsets[members]
    if rows is not None:
        out = np.concatenate([rows[offsets[j]:offsets[j + 1]] for j in members])
    else:
        if cache is None:
            raise CladError("routed_knn: this run reads its bank rows from the training cache; "
                            "load it with stages.heads.load_trained_head")
        opened = cache()
        ids = image_ids[members]
        selected = np.zeros(len(opened.image_ids), bool)
        selected[ids] = True
        maps = normal_maps(opened, selected)
        if any(i not in maps or len(maps[i]) != n for i, n in zip(ids.tolist(), sizes, strict=True)):
            raise CladError(f"{opened.store.path}: does not hold this run's bank images; "
                            "re-train with 'clad train WORK --run NAME --restart'")
        out = np.concatenate([maps.pop(i) for i in ids.tolist()], dtype=np.float32)
    local = np.full(len(desc_class), -1, np.int64)
    local[members] = np.arange(len(members))
    return ClassBank(group, members, local, torch.from_numpy(np.ascontiguousarray(out)),
                     np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

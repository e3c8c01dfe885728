"""The banks of CLAD's score mix: each mixed class's normal training rows in its d space,
built while the head chooses (``clad_mix.fit_mix``), optionally cut to a greedy coreset,
and rebuilt from the training cache when a saved head first scores.

Why a coreset (``score_mix_coreset``; docs/RESULTS.md, "CLAD that works", round 10): a class
that uses d searches its whole bank exactly, and the exact search is most of the scoring
time of a large class (bottle, 156k rows: 620 ms of an image's 650 ms on 2 cores).
PatchCore's greedy coreset keeps the rows that cover the rest, so a tenth of them keeps
almost every distance; the head logs its probe metric with the whole bank and with the cut.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from stages.heads.clad_model import CladModel
from stages.search import CORESET_BLOCK_ROWS, MemoryBank, greedy_coreset


@torch.no_grad()
def embed(model: CladModel, rows: np.ndarray | torch.Tensor, device: torch.device, label: int | None = None,
          chunk: int = 65536, module: torch.nn.Module | None = None) -> np.ndarray:
    """``[M, C_d]`` rows -> ``[M, D]`` float32 rows in label ``label``'s d space
    (``CladModel.space_for``; the adaptor's outputs without a label), or after ``module``
    (eval mode)."""
    model.eval()
    net = module if module is not None else model.space_for(label)
    x = torch.as_tensor(rows)
    out = [net(x[s:s + chunk].to(device).float()).float().cpu() for s in range(0, len(x), chunk)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.adaptor.out_dim), np.float32)


def reduce_bank(bank: MemoryBank, fraction: float, seed: int, device: torch.device,
                log: Callable[[str], None], block_rows: int = CORESET_BLOCK_ROWS) -> tuple[MemoryBank, np.ndarray]:
    """The bank cut to ``fraction`` of its rows by PatchCore's greedy coreset (in the bank's
    own space, seeded; a selection per block of at most ``block_rows`` contiguous rows,
    ``stages.search.greedy_coreset``), and the kept rows' sorted positions ``[m]`` in it."""
    n = max(1, int(round(fraction * len(bank.rows))))
    t0 = time.perf_counter()
    kept = greedy_coreset(bank.rows, n, seed, device=device, block_rows=block_rows,
                          progress=lambda k, total: log(f"train: score mix: coreset {k}/{total}"))
    blocks = -(-len(bank.rows) // block_rows)
    log(f"train: score mix: greedy coreset of {len(kept)} of {len(bank.rows)} rows"
        f"{f' in {blocks} blocks' * (blocks > 1)} ({time.perf_counter() - t0:.0f} s)")
    return MemoryBank(bank.rows[kept]), np.asarray(kept, np.int64)


def class_rows(cache: Any, images: np.ndarray, kept: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The normal rows of ``images`` (bool ``[n_images]``) and each row's image, in storage
    order (only the shards that hold them are read); only the ``kept`` positions where a
    coreset cut the bank."""
    from stages.heads.knn import bank_rows

    rows, row_image = bank_rows(cache, images)
    return (rows, row_image) if kept is None else (rows[kept], row_image[kept])


def restore_banks(model: CladModel, bank_images: np.ndarray, mixed: list[int], kept: dict[int, np.ndarray],
                  cache: Any, device: torch.device) -> dict[int, MemoryBank]:
    """The banks of a loaded head, from its training cache: per mixed class, the normal rows
    of its images among ``bank_images`` (the coreset's ``kept`` positions where it has one),
    in its d space."""
    marked = np.zeros(len(cache.image_ids), bool)
    marked[bank_images] = True
    return {k: MemoryBank(embed(model, class_rows(cache, marked & (cache.image_class == k), kept.get(k))[0],
                                device, k))
            for k in mixed}

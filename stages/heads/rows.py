"""Scoring many patch rows with bounded memory (shared by row-wise heads)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def score_in_chunks(score: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, device: torch.device,
                    chunk: int = 65536) -> torch.Tensor:
    """``score`` applied to ``[n, C]`` rows ``chunk`` at a time on ``device``;
    ``[n]`` float32 scores on the CPU."""
    out = []
    for s in range(0, len(rows), chunk):
        x = rows[s:s + chunk].to(device).float()
        out.append(score(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)

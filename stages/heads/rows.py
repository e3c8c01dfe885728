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


def score_maps_in_chunks(score: Callable[[torch.Tensor], torch.Tensor], maps: torch.Tensor, device: torch.device,
                         chunk: int = 65536) -> torch.Tensor:
    """``score`` applied to ``[n, H*W, C]`` maps whole images at a time (about
    ``chunk`` rows per call) on ``device``; ``[n, H*W]`` float32 scores on the CPU."""
    per_call = max(1, chunk // max(maps.shape[1], 1))
    out = [score(maps[i:i + per_call].to(device).float()).float().cpu() for i in range(0, len(maps), per_call)]
    return torch.cat(out) if out else torch.zeros(maps.shape[:2])

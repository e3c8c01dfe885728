"""Multi-scale patch features (pure torch): local aggregation and projection.

Follows PatchCore/GLASS: each level's p x p neighbourhood is unfolded into a
``C_j * p^2`` vector (order c, ky, kx), coarser levels are upsampled
bilinearly to the finest grid, each vector is 1-D adaptive-average-pooled to
``pretrain_dim``, the levels are concatenated and pooled again to ``C_d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def aggregate_local(feature: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C*p*p, H, W]``: each position's p x p block."""
    b, c, h, w = feature.shape
    blocks = F.unfold(feature, kernel_size=patch, padding=patch // 2, stride=1)
    return blocks.view(b, c * patch * patch, h, w)


def pool_channels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``[N, C]`` -> ``[N, dim]`` by 1-D adaptive average pooling over channels."""
    if x.shape[1] == dim:
        return x
    return F.adaptive_avg_pool1d(x.unsqueeze(1), dim).squeeze(1)


def patch_features(levels: list[torch.Tensor], patch: int, pretrain_dim: int,
                   embed_dim: int) -> torch.Tensor:
    """Backbone levels -> ``[B, H0*W0, embed_dim]`` float32 patch rows (row = y*W0 + x)."""
    h0, w0 = levels[0].shape[-2:]
    per_level = []
    for feat in levels:
        agg = aggregate_local(feat, patch)
        if agg.shape[-2:] != (h0, w0):
            agg = F.interpolate(agg, size=(h0, w0), mode="bilinear", align_corners=False)
        rows = agg.permute(0, 2, 3, 1).reshape(-1, agg.shape[1])
        per_level.append(pool_channels(rows, pretrain_dim))
    fused = pool_channels(torch.cat(per_level, dim=1), embed_dim)
    return fused.view(levels[0].shape[0], h0 * w0, embed_dim)


def max_embed_dim(channels: list[int], patch: int) -> int:
    """Largest C_d for which channel pooling never duplicates values."""
    return min(c * patch * patch for c in channels)

"""Multi-scale patch features (pure torch): local aggregation and projection.

Follows PatchCore/GLASS: each level's p x p neighbourhood is unfolded into a
``C_j * p^2`` vector (order c, ky, kx), coarser levels are upsampled
bilinearly to the finest grid, each vector is 1-D adaptive-average-pooled to
``pretrain_dim``, the levels are concatenated and pooled again to ``C_d``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import CladError
from core.settings import FeatureConfig


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


def _pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_out, n_in]`` matrix equal to ``pool_channels`` (the same adaptive bins)."""
    return pool_channels(torch.eye(n_in), n_out).T.contiguous()


class PatchProjector(torch.nn.Module):
    """``patch_features`` computed as one fixed 3x3 convolution per level.

    Unfolding, channel pooling and the final pooling are all linear, and the
    per-position pooling commutes with bilinear upsampling, so the whole
    aggregation equals ``sum_j upsample(conv(f_j, K_j))`` with fixed kernels
    ``K_j``. Same numbers up to float rounding, several times faster.
    """

    def __init__(self, channels: list[int], patch: int, pretrain_dim: int, embed_dim: int):
        super().__init__()
        self.patch = patch
        final = _pool_matrix(pretrain_dim * len(channels), embed_dim)  # [C_d, L*P]
        for j, c in enumerate(channels):
            first = _pool_matrix(c * patch * patch, pretrain_dim)  # [P, C*p*p]
            k = final[:, j * pretrain_dim:(j + 1) * pretrain_dim] @ first
            self.register_buffer(f"kernel{j}", k.view(embed_dim, c, patch, patch))

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """Backbone levels -> ``[B, H0*W0, C_d]`` float32."""
        h0, w0 = levels[0].shape[-2:]
        out = None
        for j, feat in enumerate(levels):
            y = torch.nn.functional.conv2d(feat, getattr(self, f"kernel{j}"), padding=self.patch // 2)
            if y.shape[-2:] != (h0, w0):
                y = F.interpolate(y, size=(h0, w0), mode="bilinear", align_corners=False)
            out = y if out is None else out + y
        return out.permute(0, 2, 3, 1).reshape(out.shape[0], h0 * w0, -1)


class FeatureEncoder:
    """Images -> patch rows: the frozen backbone plus the fixed projection.

    Shared by extraction (training and test images) and by ``clad score``
    (new images), so both see exactly the same features.
    """

    def __init__(self, cfg: FeatureConfig, device: torch.device, pretrained: bool = True):
        from stages.extract.backbone import create_backbone

        self.cfg, self.device = cfg, device
        self.backbone = create_backbone(cfg.backbone, cfg.layers, cfg.weights, pretrained).to(device)
        limit = max_embed_dim(self.backbone.channels, cfg.patch)
        if cfg.embed_dim > limit or cfg.pretrain_dim > limit:
            raise CladError(f"features.embed_dim={cfg.embed_dim}/pretrain_dim={cfg.pretrain_dim} exceed "
                            f"{limit} (= min channels x patch^2 of {cfg.backbone}); pooling would "
                            f"duplicate values. Set them <= {limit}")
        self.stride = self.backbone.strides[0]
        self.projector = PatchProjector(self.backbone.channels, cfg.patch, cfg.pretrain_dim,
                                        cfg.embed_dim).to(device)

    def levels(self, images: np.ndarray, timings: Any = None) -> list[list[torch.Tensor]]:
        """Backbone outputs per batch of ``batch_images`` (the device-bound half)."""
        out = []
        for i in range(0, len(images), self.cfg.batch_images):
            x = torch.from_numpy(images[i:i + self.cfg.batch_images]).permute(0, 3, 1, 2).to(self.device)
            t0 = time.perf_counter()
            out.append(self.backbone(x))
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            if timings is not None:
                timings.forward += time.perf_counter() - t0
        return out

    def project(self, levels: list[list[torch.Tensor]], timings: Any = None) -> np.ndarray:
        """Per-batch levels -> ``[M, H0*W0, C_d]`` float16 rows (can run in another thread)."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            rows = [self.projector(lv).half().contiguous().cpu().numpy() for lv in levels]
        if timings is not None:
            timings.aggregate += time.perf_counter() - t0
        return np.concatenate(rows)

    def __call__(self, images: np.ndarray, timings: Any = None) -> np.ndarray:
        """``[M, S, S, 3]`` float32 in [0, 1] -> ``[M, H0*W0, C_d]`` float16."""
        return self.project(self.levels(images, timings), timings)

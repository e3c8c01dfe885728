"""The CLAD head (seed 001): adaptor + discriminator trained contrastively.

Phase 1 (contrastive) trains with L_contrast + L_var + L_c + L_d on batches
of ``batch_contrastive`` rows; phase 2 (fine-tune) starts from the best
phase-1 model (by AUROC on held-out training images and their synthetic
anomalies, never the test set) and trains L_c + L_d on ``batch_finetune``
rows. A batch is normal : local (LAS, eq. 4 fusion with p) : global (GAS)
synthetic rows = 2 : 1 : 1. This module holds the head: its profiles,
checkpoint, scoring and export; ``clad_settings`` its settings, ``clad_train``
its training, ``clad_model`` its networks, ``clad_shell`` the GAS shell's radii.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stages.heads.base import ExportContext, Head, TrainContext
from stages.heads.clad_model import CladModel, build_model
from stages.heads.clad_settings import CladSettings
from stages.heads.clad_train import CladTrainer
from stages.heads.registry import register_head
from stages.heads.rows import score_maps_in_chunks
from stages.train.epochs import EpochLoop


@register_head
class CladHead(Head):
    """Adaptor + discriminator (CLAD, seed 001); scores each patch row alone."""

    name = "clad"
    distributed = True
    settings_class = CladSettings
    summary = "CLAD adaptor + discriminator, contrastive (seed 001)"
    reads = ("holdout", "pseudo_k", "seed")
    uses_labels = True
    profiles = {
        "paper": {},
        # a short schedule that finishes the demo in minutes on 2 CPU cores
        # CPU schedules: the paper's batches (8,000 / 100,000) give a CPU epoch a few dozen optimizer
        # steps; at the same rows per second, batches of 2,000 / 4,000 buy 5-10x the steps, and steps
        # are what an MLP trained from scratch needs (docs/RESULTS.md, "CLAD that works")
        # round 5 (docs/RESULTS.md): one contrastive epoch, then fine-tuning chosen by the probe's history;
        # no GAS ascent (it moved rows 0.6 % of r1 for 36 % of a fine-tuning step); each class's GAS shell
        # tightened while its held-out GAS rows stay separable (stages/heads/clad_shell.py)
        "fast": {"epochs_contrastive": 1, "epochs_finetune": 8, "batch_contrastive": 2000, "batch_finetune": 4000,
                 "gas_steps": 0, "gas_shell": "adaptive"},
        "long": {"epochs_contrastive": 1, "epochs_finetune": 16, "batch_contrastive": 2000, "batch_finetune": 4000,
                 "gas_steps": 0, "gas_shell": "adaptive"},
    }

    def __init__(self, model: CladModel, settings: CladSettings, meta: dict[str, Any], device: torch.device):
        self.model, self.settings, self.meta, self.device = model.to(device).eval(), settings, meta, device

    @classmethod
    def fit(cls, settings: CladSettings, ctx: TrainContext) -> tuple[CladHead, dict[str, Any]]:
        tr = CladTrainer(settings, ctx)
        model, history = EpochLoop(ctx, tr.phases()).fit(tr)
        meta = {"head": cls.name, "embed_dim": ctx.cache.embed_dim, "n_labels": ctx.n_labels,
                "class_names": ctx.cache.class_names, "cache_key": ctx.cache_key, "train_key": ctx.run_key}
        summary = {"history": history, "n_labels": ctx.n_labels,
                   "gas": tr.gas_rows.summary()}
        return cls(model, settings, meta, ctx.device), summary

    def checkpoint(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "meta": self.checkpoint_meta()}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], device: torch.device) -> CladHead:
        meta = ckpt["meta"]
        t = cls.settings_from_meta(meta)
        model = build_model(int(meta["embed_dim"]), int(meta["n_labels"]), t)
        model.load_state_dict(ckpt["model"])
        return cls(model, t, meta, device)

    def score_maps(self, maps: torch.Tensor) -> torch.Tensor:
        return score_maps_in_chunks(self.model.score_images, maps, self.device)

    def export(self, ctx: ExportContext) -> dict[str, Any]:
        """Adaptor + the discriminator's score column as one ONNX graph on patch rows
        ``[N, C_d] -> [N]``; with a score per class, on whole maps ``[n, H*W, C_d] -> [n, H*W]``
        (an image's class is chosen from all its patches)."""
        c = int(self.meta["embed_dim"])
        if self.model.disc.n_scores == 1:
            rel, info = ctx.onnx(CladScoreGraph(self.model).cpu().eval(), torch.zeros(4, c), "clad_score",
                                 {0: "rows"})
            return {"rule": "onnx_rows", "settings": info, "files": {"graph": rel}}
        rel, info = ctx.onnx(CladImageScoreGraph(self.model).cpu().eval(), torch.zeros(2, 16, c), "clad_score",
                             {0: "images", 1: "rows"})
        return {"rule": "onnx_maps", "settings": info, "files": {"graph": rel}}


class CladScoreGraph(nn.Module):
    """``[N, C_d]`` rows -> ``[N]`` anomaly scores: what ``CladModel.score`` computes (eval mode)."""

    def __init__(self, model: CladModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[2]


class CladImageScoreGraph(CladScoreGraph):
    """``[n, H*W, C_d]`` maps -> ``[n, H*W]``: what ``CladModel.score_images`` computes (eval mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.score_images(x)


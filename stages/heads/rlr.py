"""The RLR head (seed 003): reconstruct each feature map from a learnable reference;
optionally with class-aware contrastive learning (CCL, seed 002).

Training streams whole normal maps ``[B, H, W, C]`` from the cache
(``cache.image_stream.ImageStream``), never rows: the model
(``stages.heads.rlr_model.RLRModel``) decodes a learnable reference that attends to the
input only through learnable keys (MLKA) and a local window (LCA), so it
cannot copy its input through. The anomaly map is the per-patch
reconstruction error (``stages.heads.rlr_model.reconstruction_error``).

With ``ccl = classes`` or ``pseudo``, each batch of ``B`` maps is joined by
``B`` feature-level views (``stages.heads.ccl.feature_view``: a shift of at most
one cell and norm-proportional jitter; the paper's augmented images, which a
feature cache does not have), batches are class-balanced, and the loss adds
seed 002's eq. 6 terms (local CCL on the projected maps with a k x k window,
global CCL on the pooled decoded reference; tau 0.1, lambda1 : lambda2 = 1 : 1)
under the labels named: the class folders or the k-means pseudo-classes.

Every epoch checkpoints through ``stages.train.epochs.EpochLoop`` (resumable,
bit-identical on the CPU). The validation curve is the mean reconstruction
error of the held-out normal images (lower is better; recorded, not used
to select: the final model is the run's model).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cache.image_stream import ImageStream, image_maps
from core.errors import CladError
from core.files import seed_from
from core.schema import Settings, setting
from stages.heads.base import ExportContext, Head, TrainContext
from stages.heads.ccl import ccl_loss, feature_view
from stages.heads.registry import register_head
from stages.heads.rlr_model import RLRModel, reconstruction_error
from stages.train.epochs import EpochLoop, Phase, Schedule
from stages.train.labels import image_labels


@dataclass(frozen=True)
class RlrSettings(Settings):
    """RLR's own settings ('paper' profile: the paper code's depth; 'fast' trains in minutes on 2 CPU cores)."""

    epochs: int = setting(200, low=0)
    batch_images: int = setting(8, low=1, help="maps per batch")
    lr: float = setting(1e-3, above=0, help="AdamW's learning rate")
    weight_decay: float = setting(1e-4, help="AdamW's weight decay")
    dim: int = setting(256, low=1, check=lambda dim, t: dim % t.attn_heads == 0, allowed="a multiple of attn_heads",
                       help="D: reference and attention width")
    layers: int = setting(4, low=1, help="RLR blocks (the paper code's --layers 4)")
    attn_heads: int = setting(4, low=1, help='attention heads ("heads" names the per-head tables of [train])')
    window: int = setting(7, low=1, odd=True, help="LCA window side (odd), in patches")
    mask_prob: float = setting(0.5, low=0, below=1, help="MLKA key-mask probability in training")
    proj_blocks: int = setting(2, low=0, help="residual 3x3 conv blocks of the projector")
    ffn_mult: int = setting(2, low=1)
    error: str = setting("l2+cos", choices=("l2", "cos", "l2+cos"), help="per-patch reconstruction error")
    ccl: str = setting("none", choices=("none", "classes", "pseudo"), help="CCL (seed 002) under these labels")
    ccl_k: int = setting(3, low=1, odd=True,
                         help="CCL positive window side (3 keeps the view's one-cell shift inside it)")
    ccl_negatives: str = setting("window", choices=("window", "all"),
                                 help="window (cheap) | all (the paper's wording; slow on CPU)")
    window_shards: int = setting(4, low=1, help="shards read at once by the image stream (bounds memory)")
    mix_classes: bool = setting(True, added=False,
                                help="every window of shards spread over the classes (cache.stream.interleaved_order)")
    lr_schedule: str = setting("constant", choices=("constant", "cosine"), added="constant",
                               help="constant | cosine over the run's steps (stages.train.epochs.Schedule)")
    ema: float = setting(0.0, low=0, below=1, added=0.0,
                         help="decay per step of the weight average that is probed, selected and kept; 0 = off")


@contextmanager
def deterministic_kernels() -> Iterator[None]:
    """Deterministic kernels while training (restored afterwards).

    CCL's window gather (``fj[idx]``) back-propagates through an index
    accumulation whose CPU kernel sums in a thread-dependent order: measured
    on 2 threads, 99 of 100 repeated backward passes differed in the last bit
    from the first, 0 of 100 in deterministic mode. Bit-identical resumption
    needs the deterministic kernels.
    """
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _build(embed_dim: int, grid: tuple[int, int] | list[int], t: RlrSettings) -> RLRModel:
    return RLRModel(int(embed_dim), t.dim, tuple(grid), t.layers, t.attn_heads, t.window, t.mask_prob, t.proj_blocks,
                    t.ffn_mult)


def rlr_step(model: RLRModel, maps: torch.Tensor, labels: torch.Tensor, t: RlrSettings,
             view_seed: int) -> dict[str, torch.Tensor]:
    """The losses of one batch of maps ``[B, H, W, C]`` (labels ``[B]``): reconstruction, and CCL's two terms."""
    b, h, w, c = maps.shape
    if t.ccl != "none":
        gen = torch.Generator().manual_seed(view_seed)
        maps = torch.cat([maps, feature_view(maps, gen)])
        labels = torch.cat([labels, labels])
    x = maps.reshape(len(maps), h * w, c)
    recon, feats = model.forward_with_features(x)
    out = {"rec": reconstruction_error(x, recon, t.error).mean()}
    if t.ccl != "none":
        f = feats.projected.reshape(len(maps), h, w, -1)
        out["ccl"] = ccl_loss(f, feats.pooled, labels, t.ccl_k, negatives=t.ccl_negatives, reduction="mean")
    return out


class _RlrTrainer:
    """RLR's one phase for the shared loop (``stages.train.epochs.Trainable``)."""

    rate_name = "images_per_s"

    def __init__(self, t: RlrSettings, ctx: TrainContext, model: RLRModel, stream: ImageStream):
        self.t, self.ctx, self.model, self.stream = t, ctx, model, stream
        self.schedule = Schedule(t.lr, t.lr_schedule, t.ema)
        held = np.nonzero(ctx.held)[0]
        self.held_maps = torch.from_numpy(image_maps(ctx.cache, held).astype(np.float32)) if len(held) else None

    def phases(self) -> list[Phase]:
        return [Phase("reconstruct", self.t.epochs, select_best=True, select_by="probe_pixel")]

    def optimizer(self, _phase: Phase) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.t.lr, weight_decay=self.t.weight_decay)

    def start_phase(self, phase: Phase, _first_epoch: int) -> None:
        t, g = self.t, self.stream.grid
        self.ctx.log(f"train: rlr{' + CCL (' + t.ccl + ')' if t.ccl != 'none' else ''}: {phase.epochs} epochs of "
                     f"{self.stream.batches_per_epoch} batches of {t.batch_images} maps {g[0]}x{g[1]}")

    def batches_per_epoch(self, _phase: Phase) -> int:
        return self.stream.batches_per_epoch

    def batches(self, _phase: Phase, epoch: int) -> Any:
        return self.stream.epoch(epoch)

    def step(self, batch: Any, _phase: Phase, epoch: int, index: int) -> dict[str, torch.Tensor]:
        return rlr_step(self.model, batch.maps, batch.label, self.t, seed_from(self.ctx.seed, "rlr-view", epoch, index))

    def size(self, batch: Any) -> int:
        return len(batch.maps)

    def end_epoch(self, _phase: Phase, scored: torch.nn.Module) -> dict[str, Any]:
        """The probe, and the mean reconstruction error of the held-out normal maps (recorded, not selected on)."""
        def score_maps(maps: torch.Tensor) -> torch.Tensor:
            return reconstruction_maps(scored, maps, self.stream.grid, self.t.error, self.ctx.device)

        scored.eval()
        probe = self.ctx.probe(score_maps)
        val = float("nan")
        if self.held_maps is not None:
            val = float(score_maps(self.held_maps.reshape(len(self.held_maps), -1, self.held_maps.shape[-1])).mean())
        scored.train()
        return {"val_error": val, **probe}


@torch.no_grad()
def reconstruction_maps(model: RLRModel, maps: torch.Tensor, grid: tuple[int, int] | list[int], error: str,
                        device: torch.device, chunk: int = 16) -> torch.Tensor:
    """``[n, H*W, C]`` maps -> ``[n, H*W]`` per-patch reconstruction errors (the model in eval mode)."""
    n, hw, _ = maps.shape
    if hw != grid[0] * grid[1]:
        raise CladError(f"rlr head trained on {grid[0]}x{grid[1]} maps, got {hw} positions; "
                        "evaluate with the cache the run was trained on")
    out = []
    for s in range(0, n, chunk):
        x = maps[s:s + chunk].to(device).float()
        out.append(reconstruction_error(x, model(x), error).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, hw)


@register_head
class RlrHead(Head):
    """Learnable-reference reconstruction (RLR, seed 003), CCL (seed 002) optional; scores whole maps."""

    name = "rlr"
    settings_class = RlrSettings
    summary = "reconstruction from a learnable reference (RLR, seed 003); ccl=classes|pseudo adds CCL (seed 002)"
    reads = ("holdout", "pseudo_k", "seed")
    older_meta = {"heads": "attn_heads"}  # checkpoints before meta["settings"]
    profiles = {
        "paper": {},
        # about 3 minutes on the built-in set on 2 CPU cores (measured: docs/RESULTS.md)
        "fast": {"epochs": 8, "dim": 128, "layers": 2},
        "long": {"epochs": 30, "dim": 128, "layers": 2},
    }

    def __init__(self, model: RLRModel, settings: RlrSettings, meta: dict[str, Any], device: torch.device):
        self.model, self.settings, self.meta, self.device = model.to(device).eval(), settings, meta, device

    @classmethod
    def fit(cls, settings: RlrSettings, ctx: TrainContext) -> tuple[RlrHead, dict[str, Any]]:
        t, cache = settings, ctx.cache
        labels = ctx.labels
        if t.ccl != "none":
            labels, _ = image_labels(t.ccl, cache, ctx.train.pseudo_k, ctx.seed)
        stream = ImageStream(cache, t.batch_images, ctx.seed, ctx.held, image_labels=labels,
                             balanced=t.ccl != "none", device=ctx.device, window=t.window_shards,
                             mix_classes=t.mix_classes)
        meta = {"head": cls.name, "embed_dim": cache.embed_dim, "grid": list(stream.grid),
                "class_names": cache.class_names, "cache_key": ctx.cache_key, "train_key": ctx.run_key}
        torch.manual_seed(seed_from(ctx.seed, "rlr-init"))
        model = _build(cache.embed_dim, stream.grid, t).to(ctx.device)
        tr = _RlrTrainer(t, ctx, model, stream)
        loop = EpochLoop(ctx, tr.phases())
        with deterministic_kernels():
            trained, history = loop.fit(tr)
        trained.eval()
        return cls(trained, t, meta, ctx.device), {"history": history, "grid": list(stream.grid), "ccl": t.ccl}

    def checkpoint(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "meta": self.checkpoint_meta()}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], device: torch.device) -> RlrHead:
        meta = ckpt["meta"]
        t = cls.settings_from_meta(meta)
        model = _build(meta["embed_dim"], meta["grid"], t)
        model.load_state_dict(ckpt["model"])
        return cls(model, t, meta, device)

    def score_maps(self, maps: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        return reconstruction_maps(self.model, maps, self.meta["grid"], self.settings.error, self.device, chunk)

    def export(self, ctx: ExportContext) -> dict[str, Any]:
        """The model and its reconstruction error as one ONNX graph on whole maps ``[n, H*W, C_d] -> [n, H*W]``."""
        grid = self.meta["grid"]
        graph = RlrScoreGraph(self.model, self.settings.error).cpu().eval()
        example = torch.zeros(2, grid[0] * grid[1], int(self.meta["embed_dim"]))
        rel, info = ctx.onnx(graph, example, "rlr_score", {0: "images"})
        return {"rule": "onnx_maps", "settings": {**info, "grid": list(grid)}, "files": {"graph": rel}}


class RlrScoreGraph(torch.nn.Module):
    """``[n, H*W, C_d]`` maps -> ``[n, H*W]`` reconstruction errors (eval mode)."""

    def __init__(self, model: RLRModel, error: str):
        super().__init__()
        self.model, self.error = model, error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reconstruction_error(x, self.model(x), self.error)

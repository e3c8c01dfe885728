"""CLAD's training (seed 001): both phases of one run, step by step.

``CladTrainer`` is what ``stages.train.epochs.EpochLoop`` drives for the CLAD
head (``stages.heads.clad``): the batch stream, the losses of one step (L_c +
L_d, plus L_contrast + L_var in the contrastive phase), the GAS rows with
their per-class radii and adaptive shell (``clad_gas``), batch norm's
statistics refreshed after every epoch, and the held-out validation and probe
that choose the epoch each phase keeps. The networks are in ``clad_model``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cache.stream import BatchStream
from core import distributed
from core.files import seed_from, seeded
from stages.heads.base import TrainContext
from stages.heads.clad_gas import GasRows
from stages.heads.clad_model import CladModel, build_model, precise_batch_norm
from stages.heads.rows import score_in_chunks, score_maps_in_chunks
from stages.train.epochs import Phase, Schedule
from stages.train.labels import held_out_rows
from stages.train.losses import classification_loss, contrastive_loss, project_shell, score_loss, variance_loss

if TYPE_CHECKING:
    from stages.heads.clad_settings import CladSettings

VAL_ROWS = 20000  # held-out rows per kind used for the per-epoch validation AUROC


def fuse_las(xa: torch.Tensor, pair: torch.Tensor, beta: torch.Tensor, fuse: torch.Tensor) -> torch.Tensor:
    """Eq. 4 on the rows where ``fuse`` ``[n]`` is set: ``(1 - beta) x_las + beta x_pair``
    (``beta`` ``[n, 1]``, ``pair`` the same-place normal rows); the LAS row itself elsewhere."""
    return torch.where(fuse[:, None], (1 - beta) * xa + beta * pair, xa)


def phase_batches(t: CladSettings) -> list[tuple[Phase, int]]:
    """The phases with their batch sizes (rows per batch) and what each keeps (``t.keep_epoch``)."""
    out = []
    if t.use_contrastive and t.epochs_contrastive > 0:
        out.append((Phase("contrastive", t.epochs_contrastive, select_best=t.keep_epoch in ("probe", "paper"),
                          select_by="probe_pixel"), t.batch_contrastive))
    out.append((Phase("finetune", t.epochs_finetune, select_best=t.keep_epoch == "probe", select_by="probe_pixel"),
                t.batch_finetune))
    return out


# -- training ------------------------------------------------------------------------
class CladTrainer:
    """Both phases of CLAD training for one run.

    On several processes (``core.distributed``; ``torchrun``) every rank reads the same
    global batch (the configured size) and draws the same random numbers for all its
    rows, then computes on its own contiguous share of each part of it (normal, local
    and global synthetic rows; GAS ascends only the rank's share). The model is wrapped
    in ``DistributedDataParallel`` and batch norm uses the global batch's statistics
    (``clad_model.BatchNorm1d``). Each rank's losses are scaled so that their sum over
    ranks is the one-process loss: a row-mean loss x (own rows / all rows); the
    contrastive loss over the pairs of its own rows against all gathered rows (/ B^2);
    the variance loss on the gathered rows / world size. The loop multiplies the
    backward by the world size, undoing DDP's averaging of gradients, so every step
    is the one-process step (up to the order of floating-point sums). Rank 0 alone
    computes the NN radii, the validation AUROC and the probe, and shares them.
    """

    def __init__(self, t: CladSettings, ctx: TrainContext):
        self.t, self.ctx, self.device = t, ctx, ctx.device
        self.n_labels = ctx.n_labels
        self.labels_t = torch.from_numpy(ctx.labels)
        torch.manual_seed(seed_from(ctx.seed, "init"))  # same initial weights every time
        self.model = build_model(ctx.cache.embed_dim, self.n_labels, t).to(self.device)
        self.net: nn.Module = self.model  # what a training step's forward calls
        if distributed.active():
            self.net = distributed.wrap(self.model, self.device)
        self.schedule = Schedule(t.lr, t.lr_schedule, t.ema)
        self.val = held_out_rows(ctx.cache, ctx.held, VAL_ROWS, ctx.seed)
        self.gas_rows = GasRows(t, ctx, self.val)
        self.streams: dict[str, BatchStream] = {}
        self.bn_sample = (ctx.cache.row_sample(ctx.held, t.bn_rows, t.bn_rows // 2 if t.use_las else 0, ctx.seed)
                          if t.bn_refresh else None)

    def restore(self, history: list[dict[str, Any]]) -> None:
        """A resumed run: the GAS shell the last finished epoch left."""
        self.gas_rows.restore(history)

    def refresh_batch_norm(self, batch: int, model: CladModel) -> None:
        """``precise_batch_norm`` on the fixed row sample, cut into training-sized
        batches: normal : local (fused as in training) : global (the noise shell
        of normal rows, without ascent) = 2 : 1 : 1."""
        d = self.bn_sample
        if d is None:
            return
        order = torch.from_numpy(seeded(self.ctx.seed, "bn-order").permutation(len(d["normal"])))
        xn_all = torch.from_numpy(d["normal"]).float()[order]
        img_all = torch.from_numpy(d["image"].astype(np.int64))[order]
        xa_all, pair_all = torch.from_numpy(d["anomaly"]).float(), torch.from_numpy(d["pair"]).float()
        beta_all = torch.from_numpy(d["beta"]).float()
        n_chunks = max(1, len(xn_all) // max(batch // 2, 1))
        chunks = []
        for i in range(n_chunks):
            xn, img = xn_all[i::n_chunks], img_all[i::n_chunks]
            parts = [xn]
            if len(xa_all):
                sel = torch.arange(i, len(xa_all), n_chunks)
                beta = beta_all[sel][:, None]
                fuse = torch.rand(len(sel)) < self.t.fusion_p
                parts.append(fuse_las(xa_all[sel], pair_all[sel], beta, fuse))
            if self.t.use_gas:
                g = xn[: len(xn) // 2]
                r1, noise, _ = self.gas_rows.radii(img[: len(g)])
                r1, noise = (r1.cpu(), noise.cpu()) if torch.is_tensor(r1) else (r1, noise)
                parts.append(project_shell(g + noise * torch.randn_like(g), g, r1, 2 * r1))
            chunks.append(_mine(torch.cat(parts)).to(self.device))  # a distributed run: this rank's rows
        precise_batch_norm(model, chunks)

    def phase_batches(self) -> list[tuple[Phase, int]]:
        return phase_batches(self.t)

    def optimizer(self, _phase: Phase) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.t.lr, weight_decay=self.t.weight_decay)

    def stream(self, batch: int) -> BatchStream:
        n_syn = (batch // 4) if self.t.use_las else 0
        return BatchStream(self.ctx.cache, batch // 2, n_syn, self.ctx.seed, self.ctx.held, self.t.window_shards,
                           self.device, mix_classes=self.t.mix_classes)

    # -- one step ------------------------------------------------------------------
    def step(self, batch: Any, phase: Phase, _epoch: int, _index: int) -> dict[str, torch.Tensor]:
        """The losses of one batch: L_c + L_d, and in the contrastive phase L_contrast + L_var."""
        t, n = self.t, self.n_labels
        contrastive = phase.name == "contrastive"
        xn = batch.normal
        yn = self.labels_t[batch.normal_image.cpu()].to(self.device)
        xj = self.gas_rows.jittered(xn, batch.normal_image)
        parts_x, parts_y, parts_label = [_mine(xj)], [_mine(yn)], [_mine(yn)]
        sizes = [len(xn)]  # rows of each part of the global batch
        if len(batch.anomaly):
            xa = batch.anomaly
            fuse = torch.rand(len(xa), device=self.device) < t.fusion_p
            beta = batch.anomaly_beta[:, None]
            if t.fusion_beta == "fresh":  # a new blend every step, drawn from the stored betas
                beta = beta[torch.randperm(len(beta), device=self.device)]
            parts_x.append(_mine(fuse_las(xa, batch.anomaly_pair, beta, fuse)))
            parts_y.append(_mine(torch.full((len(xa),), n, device=self.device)))
            parts_label.append(_mine(self.labels_t[batch.anomaly_image.cpu()].to(self.device)))
            sizes.append(len(xa))
        if t.use_gas:
            n_gas = len(xn) // 2
            rows = distributed.share(n_gas) if distributed.active() else None
            parts_x.append(self.gas_rows.synthesise(self.model, xn[:n_gas], batch.normal_image[:n_gas], xn,
                                                    batch.normal_image, rows, yn[:n_gas]))
            parts_y.append(_mine(torch.full((n_gas,), n, device=self.device)))
            parts_label.append(_mine(yn[:n_gas]))
            sizes.append(n_gas)
        x, y = torch.cat(parts_x), torch.cat(parts_y)
        z, logits, s = self.net(x, torch.cat(parts_label)) if t.score_heads == "class" else self.net(x)
        is_anom = y == n
        if distributed.active():
            return self._shared_losses(z, logits, s, y, sizes, contrastive)
        losses = {"cls": classification_loss(logits, y), t.score_loss: score_loss(s, is_anom, t.score_loss, t.delta)}
        if contrastive:
            mask = ~is_anom if t.contrast_normals_only else None
            losses["contrast"] = contrastive_loss(z, y, t.margin, t.alpha, t.gamma, mask)
            losses["var"] = variance_loss(z, y)
        return losses

    def _shared_losses(self, z: torch.Tensor, logits: torch.Tensor, s: torch.Tensor, y: torch.Tensor,
                       sizes: list[int], contrastive: bool) -> dict[str, torch.Tensor]:
        """This rank's part of ``step``'s losses (see the class): summed over ranks, the one-process ones.
        ``sizes``: the rows of each part of the global batch (this rank holds its ``share`` of each)."""
        t, n = self.t, self.n_labels
        w = len(y) / sum(sizes)  # a row mean over own rows, weighted by own rows / all rows
        is_anom = y == n
        losses = {"cls": classification_loss(logits, y) * w,
                  t.score_loss: score_loss(s, is_anom, t.score_loss, t.delta) * w}
        if contrastive:
            z_all, y_all = distributed.all_gather_rows(z), distributed.all_gather_rows(y)
            first = sum(_rows_of(r, sizes) for r in range(distributed.rank()))  # own rows in rank order
            mask = y_all != n if t.contrast_normals_only else None
            losses["contrast"] = contrastive_loss(z_all, y_all, t.margin, t.alpha, t.gamma, mask,
                                                  rows=(first, first + len(z)))
            losses["var"] = variance_loss(z_all, y_all) / distributed.world_size()
        return losses

    @torch.no_grad()
    def validate(self, model: CladModel) -> float:
        """AUROC of s on held-out normal rows vs their synthetic rows (NaN if none)."""
        from stages.metrics import auroc  # here: it imports scikit-learn, ~1.5 s for every clad command

        normal, anomaly, _ = self.val
        if not len(normal) or not len(anomaly):
            return float("nan")
        model.eval()
        s = score_in_chunks(model.score, torch.from_numpy(np.concatenate([normal, anomaly])), self.device)
        model.train()
        y = np.r_[np.zeros(len(normal)), np.ones(len(anomaly))]
        return auroc(y, s.numpy())

    # -- what the loop asks (stages.train.epochs.Trainable) ----------------------
    rate_name = "rows_per_s"

    def phases(self) -> list[Phase]:
        return [ph for ph, _ in self.phase_batches()]

    def _stream(self, phase: Phase) -> BatchStream:
        if phase.name not in self.streams:
            self.streams[phase.name] = self.stream(dict((p.name, b) for p, b in self.phase_batches())[phase.name])
        return self.streams[phase.name]

    def start_phase(self, phase: Phase, _first_epoch: int) -> None:
        st = self._stream(phase)
        self.ctx.log(f"train: phase {phase.name}: {phase.epochs} epochs of {st.batches_per_epoch} batches "
                     f"({st.n_normal} normal + {st.n_anomaly} local + "
                     f"{st.n_normal // 2 if self.t.use_gas else 0} global synthetic rows)")

    def batches_per_epoch(self, phase: Phase) -> int:
        return self._stream(phase).batches_per_epoch

    def batches(self, phase: Phase, epoch: int) -> Any:
        return self._stream(phase).epoch(epoch)

    def size(self, batch: Any) -> int:
        return len(batch.normal) + len(batch.anomaly) + (len(batch.normal) // 2 if self.t.use_gas else 0)

    def end_epoch(self, phase: Phase, scored: nn.Module) -> dict[str, Any]:
        """Batch norm re-estimated, then the held-out synthetic rows and the probe on the scored model."""
        self.refresh_batch_norm(dict((p.name, b) for p, b in self.phase_batches())[phase.name], scored)

        @torch.no_grad()
        def probe_scores(maps: torch.Tensor) -> torch.Tensor:  # [n, H*W, C] -> [n, H*W], eval mode
            scored.eval()
            out = score_maps_in_chunks(scored.score_images, maps, self.device)
            scored.train()
            return out

        # rank 0 alone (a distributed run); every rank gets the record, so all select alike
        rec = distributed.on_main(lambda: {"val_auroc": self.validate(scored), **self.ctx.probe(probe_scores)})
        return {**rec, **self.gas_rows.adapt_shell(scored)}


def _mine(v: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the rows of ``v`` (all of ``v`` in one process)."""
    if not distributed.active():
        return v
    first, last = distributed.share(len(v))
    return v[first:last]


def _rows_of(rank: int, sizes: list[int]) -> int:
    """Rows rank ``rank`` holds of a global batch whose parts have ``sizes`` rows."""
    return sum(b - a for a, b in (distributed.share(n, rank) for n in sizes))

"""The CLAD head (seed 001): adaptor + discriminator trained contrastively.

Phase 1 (contrastive) trains with L_contrast + L_var + L_c + L_d on batches
of ``batch_contrastive`` rows; phase 2 (fine-tune) starts from the best
phase-1 model (by AUROC on held-out training images and their synthetic
anomalies, never the test set) and trains L_c + L_d on ``batch_finetune``
rows. A batch is normal : local (LAS, eq. 4 fusion with p) : global (GAS)
synthetic rows = 2 : 1 : 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cache.stream import BatchStream, TrainCache
from core import distributed
from core.files import seed_from, seeded
from core.schema import Settings, setting
from stages.heads.base import ExportContext, Head, TrainContext
from stages.heads.clad_shell import class_gas_auroc, rows_per_class, update_shell
from stages.heads.clad_model import Adaptor, CladModel, Discriminator, precise_batch_norm  # noqa: F401 - re-exported
from stages.heads.registry import register_head
from stages.heads.rows import score_in_chunks, score_maps_in_chunks
from stages.train.epochs import EpochLoop, Phase, Schedule
from stages.train.labels import held_out_rows
from stages.train.losses import (
    classification_loss,
    contrastive_loss,
    global_synthesis,
    jitter_rows,
    partner_differences,
    project_shell,
    score_loss,
    variance_loss,
)

VAL_ROWS = 20000  # held-out rows per kind used for the per-epoch validation AUROC
SHELL_ROWS = 2000  # held-out normal rows per class that measure an adaptive GAS shell


@dataclass(frozen=True)
class CladSettings(Settings):
    """CLAD's own settings; defaults are the paper's schedule ('paper' profile)."""

    epochs_contrastive: int = setting(200, low=0, help="epochs of phase 1 (contrastive)")
    epochs_finetune: int = setting(2000, low=0, help="epochs of phase 2 (fine-tune)")
    batch_contrastive: int = setting(8000, low=1, help="rows per phase-1 batch")
    batch_finetune: int = setting(100000, low=1, help="rows per phase-2 batch")
    lr: float = setting(2e-4, above=0, help="AdamW's learning rate")
    weight_decay: float = setting(1e-2, help="AdamW's weight decay")
    adaptor_dims: tuple[int, ...] = setting((1024, 512, 256), low=1, nonempty=True, help="the adaptor's layer widths")
    disc_hidden: int = setting(1024, low=1, help="the discriminator's hidden width")
    margin: float = setting(1.0, help="M of eq. 12")
    alpha: float = setting(1.0, help="alpha of eqs. 13-14")
    gamma: float = setting(-0.8)
    delta: float = setting(0.5, help="hinge margin of eqs. 21-23")
    score_loss: str = setting("hinge", choices=("hinge", "bce"), added="hinge",
                              help="L_d: hinge (eqs. 21-23) | bce (GLASS: graded, never flat)")
    contrast_normals_only: bool = setting(False)
    fusion_p: float = setting(0.5, low=0, high=1, help="probability that a local anomaly row is fused (eq. 4)")
    gas_steps: int = setting(20, low=0)
    gas_eta: float = setting(0.001)
    gas_project_every: int = setting(5, low=1)
    gas_noise: float = setting(0.015)
    gas_scale: str = setting("nn", choices=("nn", "absolute"),
                             help="nn: radii in units of the normal NN distance | absolute: docs/METHOD.md's constants")
    gas_nn_factor: float = setting(1.0, help="with gas_scale = nn: r1 = factor x median NN distance, r2 = 2 r1")
    gas_nn_stat: str = setting("median", choices=("median", "image_max"), added="median",
                               help="with gas_radius = class: r1 per class = factor x this statistic of held-out "
                                    "normal NN distances: median (over patches) | image_max (median over held-out "
                                    "images of each image's largest patch distance)")
    gas_shell: str = setting("fixed", choices=("fixed", "adaptive"), added="fixed",
                             help="fixed | adaptive (with gas_radius = class and gas_scale = nn): after every "
                                  "epoch each class's r1 shrinks while the held-out GAS rows are separated "
                                  "(AUROC >= gas_shell_target), grows when they are not, within gas_shell_min "
                                  ".. 1 x its configured r1 (stages/heads/clad_shell.py)")
    gas_shell_target: float = setting(0.95, above=0.5, below=1, added=0.95,
                                      help="with gas_shell = adaptive: the held-out GAS AUROC a class's shell "
                                           "must reach before it is tightened")
    gas_shell_min: float = setting(0.5, above=0, high=1, added=0.5,
                                   help="with gas_shell = adaptive: the tightest shell, a fraction of each "
                                        "class's configured r1")
    use_contrastive: bool = setting(True)
    use_gas: bool = setting(True)
    use_las: bool = setting(True)
    window_shards: int = setting(4, low=1)
    mix_classes: bool = setting(True, added=False,
                                help="every window of shards spread over the classes (cache.stream.interleaved_order)")
    gas_bn: str = setting("eval", choices=("eval", "train"), added="train",
                          help="eval: the ascent reads batch norm's running statistics, never updates them | train")
    gas_radius: str = setting("class", choices=("class", "global"), added="global",
                              help="class: r1 per class from its own NN distances (with gas_scale nn) | global")
    fusion_beta: str = setting("fresh", choices=("fresh", "stored"), added="stored",
                               help="fresh: eq. 4's beta redrawn every step from the batch's stored betas | stored")
    bn_refresh: bool = setting(True, added=False,
                               help="batch norm's statistics re-estimated on a sample of all classes after every epoch")
    bn_rows: int = setting(20000, low=2, added=20000,
                           help="normal rows of that sample (plus half as many local and global synthetic rows)")
    gas_direction: str = setting("noise", choices=("noise", "rows"), added="noise",
                                 help="noise (GLASS) | rows: displacements along differences of same-class rows")
    gas_rows_scale: float = setting(2.0, added=2.0,
                                    help="with gas_direction = rows: the shell's radii in units of the class r1")
    lr_schedule: str = setting("constant", choices=("constant", "cosine"), added="constant",
                               help="constant | cosine: lr decays to 0 over each phase's steps (stateless: resumable)")
    ema: float = setting(0.0, low=0, below=1, added=0.0,
                         help="decay per step of an average of the weights that is evaluated and kept; 0 = off")
    normal_jitter: float = setting(0.0, low=0, added=0.0,
                                   help="normal rows trained on with Gaussian noise of this norm, in units of "
                                        "their class's r1 (0 = off): unseen normal patches lie ~r1 from the "
                                        "nearest training patch, where GAS puts its shell")
    score_heads: str = setting("one", choices=("one", "class"), added="one",
                               help="one score output for every class (the paper) | class: one per label, each "
                                    "image scored by its class's (the classification head routes it)")
    keep_epoch: str = setting("probe", choices=("probe", "paper", "last"), added="probe",
                              help="which epoch each phase keeps: probe = its best probe_pixel; paper = the "
                                   "contrastive phase's best (the paper fine-tunes 'the best' phase-1 model) and the "
                                   "fine-tuning's last epoch; last = every phase's last")


def build_model(in_dim: int, n_labels: int, t: CladSettings) -> CladModel:
    """The network ``t`` describes, for ``in_dim`` features and ``n_labels`` labels (random weights)."""
    return CladModel(in_dim, n_labels, t.adaptor_dims, t.disc_hidden, t.score_heads)


def fuse_las(xa: torch.Tensor, pair: torch.Tensor, beta: torch.Tensor, fuse: torch.Tensor) -> torch.Tensor:
    """Eq. 4 on the rows where ``fuse`` ``[n]`` is set: ``(1 - beta) x_las + beta x_pair``
    (``beta`` ``[n, 1]``, ``pair`` the same-place normal rows); the LAS row itself elsewhere."""
    return torch.where(fuse[:, None], (1 - beta) * xa + beta * pair, xa)


def _bank(cache: TrainCache, held: np.ndarray, order: Any, n_bank: int) -> torch.Tensor:
    """Up to ``n_bank`` training normal rows ``[n, C]`` (float32), read from shards in ``order``."""
    bank, rows = [], 0
    for part in cache.normal_parts(held, order):
        bank.append(part)
        rows += len(part)
        if rows >= n_bank:
            break
    return torch.from_numpy(np.concatenate(bank, dtype=np.float32)[:n_bank])


def median_nn_distance(cache: TrainCache, held: np.ndarray, probe: np.ndarray, seed: int,
                       n_probe: int = 2000, n_bank: int = 50000, shards: np.ndarray | None = None) -> float:
    """Median distance of held-out normal rows ``probe`` to their nearest
    training normal row (of ``shards`` only, default all, in a seeded order)."""
    from stages.search import nearest_rows

    order = seeded(seed, "nn-bank").permutation(cache.n_shards) if shards is None else shards
    x = _bank(cache, held, order, n_bank)
    q = torch.from_numpy(probe[seeded(seed, "nn-probe").permutation(len(probe))[:n_probe]].astype(np.float32))
    dist, _ = nearest_rows(q, x, (x * x).sum(1))
    return float(dist[:, 0].median())


def image_max_statistic(per_image: list[np.ndarray]) -> float:
    """Median over images of each image's largest patch distance (``per_image``: one
    ``[rows]`` array of NN distances per held-out image): where a typical normal
    image's worst patch lies, i.e. what its max image score sees."""
    return float(np.median([float(np.max(d)) for d in per_image]))


def image_max_nn_distance(cache: TrainCache, held: np.ndarray, maps: dict[int, np.ndarray], seed: int,
                          shards: np.ndarray, n_bank: int = 50000) -> float:
    """``image_max_statistic`` of held-out images ``maps`` (image -> ``[rows, C]``)
    against up to ``n_bank`` training rows of ``shards`` (the bank ``median_nn_distance`` reads)."""
    from stages.search import nearest_rows

    x = _bank(cache, held, shards, n_bank)
    xx = (x * x).sum(1)
    return image_max_statistic([nearest_rows(torch.from_numpy(m.astype(np.float32)), x, xx)[0][:, 0].numpy()
                                for m in maps.values()])


def class_nn_distances(cache: TrainCache, held: np.ndarray, seed: int, stat: str = "median") -> np.ndarray:
    """``[n_classes]`` per class, a statistic of its held-out normal rows' distances
    to that class's training rows (NaN for a class without held-out images):
    ``median`` over rows, or ``image_max`` (``image_max_statistic``).

    GLASS sets its GAS radius per class; one radius for all classes puts the
    synthetic shell inside the normal spread of a coarse class and far
    outside a fine one. Only the shards holding the class's images are read,
    and only the class's own training rows form the bank: shards are cut by
    image count, so one shard may end one class and start the next (until
    2026-12-04 the bank was every row of the shards a class starts, which
    mixed in the next class's first images and failed for a class that starts
    no shard, e.g. 8 images a class in 16-image shards).
    """
    from stages.train.labels import normal_maps

    out = np.full(len(cache.class_names), np.nan)
    for c in range(len(cache.class_names)):
        sel = held & (cache.image_class == c)
        if not sel.any():
            continue
        maps = normal_maps(cache, sel)
        own = cache.image_class == c
        holding = [s for s in range(cache.n_shards) if own[cache.image_offsets[s]:cache.image_offsets[s + 1]].any()]
        shards = seeded(seed, "nn-bank", c).permutation(np.array(holding, dtype=np.int64))
        excluded = held | ~own  # the bank: this class's training rows only
        if stat == "image_max":
            out[c] = image_max_nn_distance(cache, excluded, maps, seed, shards)
        else:
            out[c] = median_nn_distance(cache, excluded, np.concatenate(list(maps.values())), seed, shards=shards)
    return out


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
class _Trainer:
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
        self.r1, self.noise, self.eta = distributed.on_main(self._gas_scale)
        self.r2 = 2 * self.r1
        self.class_of_image = torch.from_numpy(ctx.cache.image_class.astype(np.int64))
        self.class_nn_r1 = distributed.on_main(self._class_radii)  # r1 per class at the configured factor
        n_classes = len(ctx.cache.class_names)
        adaptive = t.gas_shell == "adaptive" and self.class_nn_r1 is not None
        if t.gas_shell == "adaptive" and not adaptive:
            ctx.log("train: gas_shell = adaptive needs a radius per class (gas_radius = class, gas_scale = nn); "
                    "the shell stays fixed")
        self.shell = np.ones(n_classes) if adaptive else None  # factor of each class's r1 (gas_shell)
        self.shell_rows = (rows_per_class(self.val[2], ctx.cache.image_class, n_classes, SHELL_ROWS,
                                          seeded(ctx.seed, "shell-rows")) if adaptive else {})
        self.streams: dict[str, BatchStream] = {}
        self.bn_sample = (ctx.cache.row_sample(ctx.held, t.bn_rows, t.bn_rows // 2 if t.use_las else 0, ctx.seed)
                          if t.bn_refresh else None)

    @property
    def class_r1(self) -> torch.Tensor | None:
        """``[n_classes]`` r1 per class (None with one radius for all): the configured
        radius, times the class's adaptive shell factor (``gas_shell = adaptive``)."""
        if self.class_nn_r1 is None or self.shell is None:
            return self.class_nn_r1
        return self.class_nn_r1 * torch.from_numpy(self.shell).float()

    def adapt_shell(self, scored: CladModel) -> dict[str, Any]:
        """``gas_shell = adaptive``: each class's held-out GAS AUROC under ``scored`` (the same
        noise every epoch), and the shell factors it gives the next epoch
        (``clad_shell.update_shell``); {} when fixed."""
        if self.shell is None:
            return {}
        r1 = self.class_r1

        def measure() -> list[float]:
            scored.eval()
            auc = class_gas_auroc(lambda x: score_in_chunks(scored.score, x, self.device), self.shell_rows,
                                  r1, len(self.shell), seed_from(self.ctx.seed, "shell"))
            scored.train()
            return auc.tolist()

        auc = np.array(distributed.on_main(measure), dtype=np.float64)  # every rank updates alike
        self.shell = update_shell(self.shell, auc, self.t.gas_shell_target, low=self.t.gas_shell_min)
        self.ctx.log("train: GAS shell per class (held-out GAS AUROC -> next r1 factor): " + ", ".join(
            f"{n} {a:.3f} -> {f:.2f}" for n, a, f in zip(self.ctx.cache.class_names, auc, self.shell, strict=True)))
        return {"gas_auroc": auc.tolist(), "gas_shell": self.shell.tolist()}

    def restore(self, history: list[dict[str, Any]]) -> None:
        """A resumed run: the shell factors the last finished epoch left."""
        for rec in reversed(history):
            if self.shell is not None and "gas_shell" in rec:
                self.shell = np.array(rec["gas_shell"], dtype=np.float64)
                return

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
                r1, noise, _ = self.gas_radii(img[: len(g)])
                r1, noise = (r1.cpu(), noise.cpu()) if torch.is_tensor(r1) else (r1, noise)
                parts.append(project_shell(g + noise * torch.randn_like(g), g, r1, 2 * r1))
            chunks.append(_mine(torch.cat(parts)).to(self.device))  # a distributed run: this rank's rows
        precise_batch_norm(model, chunks)

    def _class_radii(self) -> torch.Tensor | None:
        """``[n_classes]`` r1 per class (``gas_radius = class`` with ``gas_scale = nn``), else None;
        a class without held-out images takes the global r1."""
        if self.t.gas_radius != "class" or self.t.gas_scale != "nn" or not len(self.val[0]):
            return None
        d = class_nn_distances(self.ctx.cache, self.ctx.held, self.ctx.seed, self.t.gas_nn_stat)
        r1 = np.where(np.isfinite(d), self.t.gas_nn_factor * d, self.r1)
        self.ctx.log("train: GAS radius r1 per class: " + ", ".join(
            f"{n} {v:.3g}" for n, v in zip(self.ctx.cache.class_names, r1, strict=True)))
        return torch.tensor(r1, dtype=torch.float32)

    def _gas_scale(self) -> tuple[float, float, float]:
        """GAS radius r1, per-dimension noise and ascent step.

        ``absolute``: docs/METHOD.md's constants (noise 0.015, r1 = 0.85 * noise *
        sqrt(C_d), i.e. [0.5, 1.0] at 1536). ``nn``: the same geometry in units
        of this cache's data: r1 = factor x the median distance of held-out
        normal patches to their nearest training patch, noise = r1 / sqrt(C_d),
        and the step keeps GLASS' step-to-radius ratio (0.001 / 0.5).
        """
        c, t = self.ctx.cache.embed_dim, self.t
        if t.gas_scale == "absolute" or not len(self.val[0]):
            return 0.85 * t.gas_noise * math.sqrt(c), t.gas_noise, t.gas_eta
        d = median_nn_distance(self.ctx.cache, self.ctx.held, self.val[0], self.ctx.seed)
        r1 = t.gas_nn_factor * d
        return r1, r1 / math.sqrt(c), t.gas_eta * r1 / 0.5

    def phase_batches(self) -> list[tuple[Phase, int]]:
        return phase_batches(self.t)

    def optimizer(self, _phase: Phase) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.t.lr, weight_decay=self.t.weight_decay)

    def stream(self, batch: int) -> BatchStream:
        n_syn = (batch // 4) if self.t.use_las else 0
        return BatchStream(self.ctx.cache, batch // 2, n_syn, self.ctx.seed, self.ctx.held, self.t.window_shards,
                           self.device, mix_classes=self.t.mix_classes)

    # -- one step ------------------------------------------------------------------
    def gas_radii(self, image: torch.Tensor) -> tuple[Any, Any, Any]:
        """(r1, noise, eta) for rows of global images ``image`` ``[n]``: floats, or
        ``[n, 1]`` tensors with per-class radii (noise and step scale with r1)."""
        if self.class_r1 is None:
            return self.r1, self.noise, self.eta
        r1 = self.class_r1[self.class_of_image[image.cpu()]].to(self.device)[:, None]
        scale = r1 / self.r1
        return r1, self.noise * scale, self.eta * scale

    def gas(self, x: torch.Tensor, image: torch.Tensor, pool: torch.Tensor | None = None,
            pool_image: torch.Tensor | None = None, rows: tuple[int, int] | None = None,
            label: torch.Tensor | None = None) -> torch.Tensor:
        """Global anomaly synthesis of normal rows ``x`` of images ``image`` (``losses.global_synthesis``);
        with ``gas_direction = rows`` displaced along differences to rows of ``pool`` of the same class.
        ``rows``: only those rows of ``x`` are synthesised (the randomness is drawn for all).
        ``label`` ``[n]``: the rows' labels, which a score per class ascends on."""
        r1, noise, eta = self.gas_radii(image)
        start = None
        if self.t.gas_direction == "rows":
            cls = self.class_of_image.to(x.device)
            pool, pool_image = (x, image) if pool is None else (pool, pool_image)
            start = partner_differences(x, cls[image], pool, cls[pool_image])
            r1, eta = r1 * self.t.gas_rows_scale, eta * self.t.gas_rows_scale
        return global_synthesis(self.model, x, r1, noise, eta, self.t.gas_steps, self.t.gas_project_every,
                                self.t.gas_bn, start, rows, label if self.t.score_heads == "class" else None)

    def jittered(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Normal rows ``x`` ``[B, C]`` plus Gaussian noise of expected norm ``normal_jitter`` x
        their class's r1 (``x`` itself when off; GAS starts from the rows without it)."""
        if not self.t.normal_jitter:
            return x
        return jitter_rows(x, self.gas_radii(image)[0], self.t.normal_jitter)

    def step(self, batch: Any, phase: Phase, _epoch: int, _index: int) -> dict[str, torch.Tensor]:
        """The losses of one batch: L_c + L_d, and in the contrastive phase L_contrast + L_var."""
        t, n = self.t, self.n_labels
        contrastive = phase.name == "contrastive"
        xn = batch.normal
        yn = self.labels_t[batch.normal_image.cpu()].to(self.device)
        parts_x, parts_y, parts_label = [_mine(self.jittered(xn, batch.normal_image))], [_mine(yn)], [_mine(yn)]
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
            parts_x.append(self.gas(xn[:n_gas], batch.normal_image[:n_gas], xn, batch.normal_image, rows,
                                    yn[:n_gas]))
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
        from sklearn.metrics import roc_auc_score  # here: importing scikit-learn costs every clad command ~1.5 s

        normal, anomaly, _ = self.val
        if not len(normal) or not len(anomaly):
            return float("nan")
        model.eval()
        s = score_in_chunks(model.score, torch.from_numpy(np.concatenate([normal, anomaly])), self.device)
        model.train()
        y = np.r_[np.zeros(len(normal)), np.ones(len(anomaly))]
        return float(roc_auc_score(y, s.numpy()))

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
        return {**rec, **self.adapt_shell(scored)}


def _mine(v: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the rows of ``v`` (all of ``v`` in one process)."""
    if not distributed.active():
        return v
    first, last = distributed.share(len(v))
    return v[first:last]


def _rows_of(rank: int, sizes: list[int]) -> int:
    """Rows rank ``rank`` holds of a global batch whose parts have ``sizes`` rows."""
    return sum(b - a for a, b in (distributed.share(n, rank) for n in sizes))


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
        tr = _Trainer(settings, ctx)
        model, history = EpochLoop(ctx, tr.phases()).fit(tr)
        meta = {"head": cls.name, "embed_dim": ctx.cache.embed_dim, "n_labels": ctx.n_labels,
                "class_names": ctx.cache.class_names, "cache_key": ctx.cache_key, "train_key": ctx.run_key}
        summary = {"history": history, "n_labels": ctx.n_labels,
                   "gas": {"r1": tr.r1, "r2": tr.r2, "noise": tr.noise, "eta": tr.eta,
                           "class_r1": None if tr.class_r1 is None else tr.class_r1.tolist()}}
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


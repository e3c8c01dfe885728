"""Stage 2: train a head on the cached features (resumable, never re-extracts).

CLAD: phase 1 (contrastive) trains with L_contrast + L_var + L_c + L_d on
batches of ``batch_contrastive`` rows; phase 2 (fine-tune) starts from the
best phase-1 model (by AUROC on held-out training images and their synthetic
anomalies, never the test set) and trains L_c + L_d on ``batch_finetune``
rows. A batch is normal : local (LAS, eq. 4 fusion with p) : global (GAS)
synthetic rows = 2 : 1 : 1.

Every epoch ends with an atomic checkpoint (model, optimizer, phase, epoch,
RNG state, cache and config keys). Each epoch reseeds torch's RNG from
(seed, phase, epoch) and the stream is a function of (seed, epoch), so a run
killed at any point and resumed ends with bit-identical weights on the CPU.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from cache.stream import BatchStream, TrainCache
from core.errors import CladError, StaleError
from core.files import save_torch_atomic, seed_from, seeded, write_atomic
from core.settings import Config
from stages.heads import KnnHead, greedy_coreset, score_rows
from stages.losses import (
    classification_loss,
    contrastive_loss,
    gas_ascent_loss,
    project_shell,
    score_loss,
    variance_loss,
)
from stages.maps import anomaly_maps, image_scores
from stages.models import CladHead

VAL_ROWS = 20000  # held-out rows per kind used for the per-epoch validation AUROC


# -- labels and held-out images ------------------------------------------------
def holdout_images(cache: TrainCache, fraction: float, seed: int) -> np.ndarray:
    """Bool per image: held out of training (validation and threshold), per class."""
    out = np.zeros(len(cache.image_ids), bool)
    if fraction <= 0:
        return out
    for c in range(len(cache.class_names)):
        idx = np.nonzero(cache.image_class == c)[0]
        if len(idx) < 3:
            continue
        n = max(1, int(round(fraction * len(idx))))
        out[seeded(seed, "holdout", c).choice(idx, n, replace=False)] = True
    return out


def image_means(cache: TrainCache) -> np.ndarray:
    """``[n_images, C]`` float32: mean normal feature of each image (one pass, bounded)."""
    out = np.zeros((len(cache.image_ids), cache.embed_dim), np.float32)
    for s in range(cache.n_shards):
        d = cache.load(s, ("features", "anomaly", "image"))
        normal = d["anomaly"] == 0
        imgs = d["image"][normal]
        feats = d["features"][normal].astype(np.float32)
        for i in np.unique(imgs):
            out[i] = feats[imgs == i].mean(0)
    return out


def pseudo_labels(cache: TrainCache, k: int, seed: int) -> np.ndarray:
    """Paper 002: k-means (faiss) on image-level features -> a label per image."""
    import faiss

    x = image_means(cache)
    k = max(1, min(k, len(x)))
    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed % (2**31), verbose=False)
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels[:, 0].astype(np.int64)


def image_labels(cfg: Config, cache: TrainCache) -> tuple[np.ndarray, int]:
    """Label per image and the number of normal labels N (anomaly label = N)."""
    if cfg.data.labels == "pseudo":
        k = cfg.train.pseudo_k or 2 * len(cache.class_names)
        return pseudo_labels(cache, k, cfg.train.seed), k
    if cfg.data.labels != "classes":
        raise CladError(f"data.labels={cfg.data.labels!r}: choose classes or pseudo")
    return cache.image_class.astype(np.int64), len(cache.class_names)


def held_out_rows(cache: TrainCache, held: np.ndarray, limit: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Held-out normal rows, their synthetic rows (each capped), and per-image normal maps."""
    normals, anomalies, per_image = [], [], {}
    for s in range(cache.n_shards):
        if not held[cache.image_offsets[s]:cache.image_offsets[s + 1]].any():
            continue  # no held-out image in this shard: do not read it
        d = cache.load(s, ("features", "anomaly", "image"))
        keep = held[d["image"]]
        normal = keep & (d["anomaly"] == 0)
        normals.append(d["features"][normal])
        anomalies.append(d["features"][keep & (d["anomaly"] == 1)])
        for i in np.unique(d["image"][normal]):
            per_image[int(i)] = d["features"][normal & (d["image"] == i)]
    rng = seeded(seed, "val")

    def cap(parts: list[np.ndarray]) -> np.ndarray:
        x = np.concatenate(parts) if parts else np.zeros((0, cache.embed_dim), np.float16)
        return x[np.sort(rng.choice(len(x), limit, replace=False))] if len(x) > limit else x

    return cap(normals), cap(anomalies), per_image


def median_nn_distance(cache: TrainCache, held: np.ndarray, probe: np.ndarray, seed: int,
                       n_probe: int = 2000, n_bank: int = 50000) -> float:
    """Median distance of held-out normal rows to their nearest training normal row."""
    import faiss

    bank, rows = [], 0
    for part in cache.normal_parts(held, seeded(seed, "nn-bank").permutation(cache.n_shards)):
        bank.append(part)
        rows += len(part)
        if rows >= n_bank:
            break
    x = np.concatenate(bank, dtype=np.float32)[:n_bank]
    q = probe[seeded(seed, "nn-probe").permutation(len(probe))[:n_probe]].astype(np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    dist, _ = index.search(q, 1)
    return float(np.median(np.sqrt(np.maximum(dist[:, 0], 0))))


# -- the trainer -------------------------------------------------------------------
@dataclass
class RunFiles:
    root: Path

    @property
    def latest(self) -> Path:
        return self.root / "checkpoints" / "latest.pt"

    @property
    def final(self) -> Path:
        return self.root / "checkpoints" / "final.pt"

    @property
    def best_phase1(self) -> Path:
        return self.root / "checkpoints" / "best_contrastive.pt"

    @property
    def summary(self) -> Path:
        return self.root / "train.json"


Progress = Callable[[str, int, int], Any]  # (phase, epoch, epochs) -> bar-like with update/set_postfix


class CladTrainer:
    """Both phases of CLAD training on one run directory."""

    def __init__(self, cfg: Config, cache: TrainCache, files: RunFiles, device: torch.device,
                 cache_key: str):
        self.cfg, self.cache, self.files, self.device = cfg, cache, files, device
        self.t = cfg.train
        self.cache_key, self.train_key = cache_key, cfg.train_key()
        self.held = holdout_images(cache, self.t.holdout, self.t.seed)
        self.labels_of_image, self.n_labels = image_labels(cfg, cache)
        self.labels_t = torch.from_numpy(self.labels_of_image)
        torch.manual_seed(seed_from(self.t.seed, "init"))  # same initial weights every time
        self.model = CladHead(cache.embed_dim, self.n_labels, self.t.adaptor_dims, self.t.disc_hidden).to(device)
        self.val = held_out_rows(cache, self.held, VAL_ROWS, self.t.seed)
        self.r1, self.noise, self.eta = self._gas_scale()
        self.r2 = 2 * self.r1

    def _gas_scale(self) -> tuple[float, float, float]:
        """GAS radius r1, per-dimension noise and ascent step.

        ``absolute``: METHOD.md's constants (noise 0.015, r1 = 0.85 * noise *
        sqrt(C_d), i.e. [0.5, 1.0] at 1536). ``nn``: the same geometry in units
        of this cache's data: r1 = factor x the median distance of held-out
        normal patches to their nearest training patch, noise = r1 / sqrt(C_d),
        and the step keeps GLASS' step-to-radius ratio (0.001 / 0.5).
        """
        c, t = self.cache.embed_dim, self.t
        if t.gas_scale == "absolute" or not len(self.val[0]):
            return 0.85 * t.gas_noise * math.sqrt(c), t.gas_noise, t.gas_eta
        if t.gas_scale != "nn":
            raise CladError(f"train.gas_scale={t.gas_scale!r}: choose absolute or nn")
        d = median_nn_distance(self.cache, self.held, self.val[0], t.seed)
        r1 = t.gas_nn_factor * d
        return r1, r1 / math.sqrt(c), t.gas_eta * r1 / 0.5

    # -- phases ------------------------------------------------------------------
    def phases(self) -> list[tuple[str, int, int]]:
        out = []
        if self.t.use_contrastive and self.t.epochs_contrastive > 0:
            out.append(("contrastive", self.t.epochs_contrastive, self.t.batch_contrastive))
        out.append(("finetune", self.t.epochs_finetune, self.t.batch_finetune))
        return out

    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.t.lr, weight_decay=self.t.weight_decay)

    def _stream(self, batch: int) -> BatchStream:
        n_syn = (batch // 4) if self.t.use_las else 0
        return BatchStream(self.cache, batch // 2, n_syn, self.t.seed, self.held, self.t.window_shards,
                           self.device)

    # -- one step ------------------------------------------------------------------
    def _gas(self, x: torch.Tensor) -> torch.Tensor:
        """Global anomaly synthesis: noise, gradient ascent, projection to the shell."""
        t = self.t
        x_g = x + self.noise * torch.randn_like(x)
        for step in range(1, t.gas_steps + 1):
            x_g = x_g.detach().requires_grad_(True)
            loss = gas_ascent_loss(self.model(x_g)[2])
            (grad,) = torch.autograd.grad(loss, x_g)
            x_g = x_g + self.eta * grad / (grad.norm(dim=1, keepdim=True) + 1e-10)
            if step % t.gas_project_every == 0 or step == t.gas_steps:
                x_g = project_shell(x_g, x, self.r1, self.r2)
        return project_shell(x_g.detach(), x, self.r1, self.r2)

    def step(self, batch: Any, contrastive: bool) -> dict[str, torch.Tensor]:
        t, n = self.t, self.n_labels
        xn = batch.normal
        yn = self.labels_t[batch.normal_image.cpu()].to(self.device)
        parts_x, parts_y = [xn], [yn]
        if len(batch.anomaly):
            xa = batch.anomaly
            fuse = torch.rand(len(xa), device=self.device) < t.fusion_p
            beta = batch.anomaly_beta[:, None]
            fused = (1 - beta) * xa + beta * batch.anomaly_pair  # eq. 4
            parts_x.append(torch.where(fuse[:, None], fused, xa))
            parts_y.append(torch.full((len(xa),), n, device=self.device))
        if t.use_gas:
            n_gas = len(xn) // 2
            parts_x.append(self._gas(xn[:n_gas]))
            parts_y.append(torch.full((n_gas,), n, device=self.device))
        x, y = torch.cat(parts_x), torch.cat(parts_y)
        z, logits, s = self.model(x)
        is_anom = y == n
        losses = {"cls": classification_loss(logits, y), t.score_loss: score_loss(s, is_anom, t.score_loss, t.delta)}
        if contrastive:
            mask = ~is_anom if t.contrast_normals_only else None
            losses["contrast"] = contrastive_loss(z, y, t.margin, t.alpha, t.gamma, mask)
            losses["var"] = variance_loss(z, y)
        return losses

    # -- validation --------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> float:
        """AUROC of s on held-out normal rows vs their synthetic rows (NaN if none)."""
        normal, anomaly, _ = self.val
        if not len(normal) or not len(anomaly):
            return float("nan")
        self.model.eval()
        s = score_rows(self.model, torch.from_numpy(np.concatenate([normal, anomaly])), self.device)
        self.model.train()
        y = np.r_[np.zeros(len(normal)), np.ones(len(anomaly))]
        return float(roc_auc_score(y, s.numpy()))

    # -- the loop ---------------------------------------------------------------
    def _state(self, phase: int, epoch: int, opt: torch.optim.Optimizer, best: float,
               history: list[dict[str, Any]]) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": opt.state_dict(), "phase": phase,
                "epoch": epoch, "best": best, "history": history, "rng": torch.get_rng_state(),
                "cache_key": self.cache_key, "train_key": self.train_key}

    def run(self, make_bar: Progress, log: Callable[[str], None]) -> dict[str, Any]:
        phases = self.phases()
        phase, epoch, best, history = 0, 0, -1.0, []
        opt = self._optimizer()
        if self.files.latest.is_file():
            ck = torch.load(self.files.latest, map_location="cpu", weights_only=True)
            if ck["cache_key"] != self.cache_key or ck["train_key"] != self.train_key:
                raise StaleError(f"{self.files.latest}: checkpoint from another cache or configuration; "
                                 "use another --run name or --restart")
            self.model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            phase, epoch, best, history = ck["phase"], ck["epoch"], ck["best"], ck["history"]
            log(f"train: resuming at {phases[min(phase, len(phases) - 1)][0]} epoch {epoch}")
        t_start = time.perf_counter()
        while phase < len(phases):
            name, epochs, batch = phases[phase]
            contrastive = name == "contrastive"
            stream = self._stream(batch)
            if epoch < epochs:
                log(f"train: phase {name}: {epochs} epochs of {stream.batches_per_epoch} batches "
                    f"({stream.n_normal} normal + {stream.n_anomaly} local + "
                    f"{stream.n_normal // 2 if self.t.use_gas else 0} global synthetic rows)")
            bar = make_bar(name, epoch, epochs)
            while epoch < epochs:
                torch.manual_seed(seed_from(self.t.seed, phase, epoch))
                self.model.train()
                sums: dict[str, float] = {}
                rows, t0 = 0, time.perf_counter()
                for b in stream.epoch(epoch):
                    losses = self.step(b, contrastive)
                    total = sum(losses.values())
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    opt.step()
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + v.item()
                    rows += len(b.normal) + len(b.anomaly) + (len(b.normal) // 2 if self.t.use_gas else 0)
                n_b = stream.batches_per_epoch
                rec = {"phase": name, "epoch": epoch, **{k: v / n_b for k, v in sums.items()},
                       "val_auroc": self.validate(), "rows_per_s": rows / (time.perf_counter() - t0)}
                history.append(rec)
                epoch += 1
                if contrastive and not (rec["val_auroc"] <= best):  # NaN counts as better than nothing
                    best = rec["val_auroc"] if rec["val_auroc"] == rec["val_auroc"] else best
                    save_torch_atomic({"model": self.model.state_dict(), "epoch": epoch}, self.files.best_phase1)
                save_torch_atomic(self._state(phase, epoch, opt, best, history), self.files.latest)
                bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k not in ("phase", "epoch")})
                bar.update(1)
            bar.close()
            phase, epoch = phase + 1, 0
            if contrastive and phase < len(phases):
                if self.files.best_phase1.is_file():
                    self.model.load_state_dict(torch.load(self.files.best_phase1, map_location="cpu",
                                                          weights_only=True)["model"])
                opt = self._optimizer()
                save_torch_atomic(self._state(phase, 0, opt, best, history), self.files.latest)
        threshold, held_scores = self.calibrate()
        meta = self.meta(threshold)
        save_torch_atomic({"model": self.model.state_dict(), "meta": meta}, self.files.final)
        return {"history": history, "threshold": threshold, "held_out_image_scores": held_scores,
                "labels": self.cfg.data.labels, "n_labels": self.n_labels,
                "gas": {"r1": self.r1, "r2": self.r2, "noise": self.noise, "eta": self.eta},
                "image_labels": self.labels_of_image.tolist(),
                "seconds_this_session": time.perf_counter() - t_start}

    def calibrate(self) -> tuple[float, list[float]]:
        return calibrate_threshold(self.model, self.val[2], self.cfg, self.device)

    def meta(self, threshold: float) -> dict[str, Any]:
        return {"head": "clad", "embed_dim": self.cache.embed_dim, "n_labels": self.n_labels,
                "adaptor_dims": list(self.t.adaptor_dims), "disc_hidden": self.t.disc_hidden,
                "class_names": self.cache.class_names, "threshold": threshold,
                "cache_key": self.cache_key, "train_key": self.train_key}


def calibrate_threshold(head: Any, per_image: dict[int, np.ndarray], cfg: Config,
                        device: torch.device) -> tuple[float, list[float]]:
    """Verdict threshold from training normals only: a high quantile of the
    image scores of held-out normal training images (NaN when none held out)."""
    if not per_image:
        return float("nan"), []
    head.eval()
    size = cfg.features.crop or cfg.features.resize
    rows = [torch.from_numpy(v.astype(np.float32)) for v in per_image.values()]
    scores = torch.stack([score_rows(head, r, device) for r in rows])
    s = image_scores(anomaly_maps(scores, size, cfg.evaluate.sigma))
    return float(np.quantile(s, cfg.train.threshold_quantile)), [float(v) for v in s]


def train_knn(cfg: Config, cache: TrainCache, files: RunFiles, cache_key: str,
              device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """The baseline head: a memory bank of normal training rows (optional coreset)."""
    t = cfg.train
    held = holdout_images(cache, t.holdout, t.seed)
    bank = cache.normal_rows(held)
    if t.knn_coreset < 1.0:
        n = max(1, int(len(bank) * t.knn_coreset))
        log(f"train: greedy coreset {n} of {len(bank)} rows")
        bank = bank[greedy_coreset(bank, n, t.seed, progress=lambda k, total: log(f"train: coreset {k}/{total}"),
                                   device=device)]
    head = KnnHead(bank, t.knn_k)
    _, _, per_image = held_out_rows(cache, held, 0, t.seed)
    threshold, held_scores = calibrate_threshold(head, per_image, cfg, device)
    meta = {"head": "knn", "embed_dim": cache.embed_dim, "knn_k": t.knn_k, "class_names": cache.class_names,
            "threshold": threshold, "cache_key": cache_key, "train_key": cfg.train_key(), "bank_rows": len(bank)}
    save_torch_atomic({"bank": torch.from_numpy(bank), "meta": meta}, files.final)
    return {"history": [], "threshold": threshold, "held_out_image_scores": held_scores,
            "bank_rows": len(bank)}


def write_summary(files: RunFiles, summary: dict[str, Any]) -> None:
    write_atomic(files.summary, json.dumps(summary, indent=2, default=float))

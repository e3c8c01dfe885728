"""CLAD's global anomaly synthesis (GAS) during training: its radii and its shell.

``GasRows`` holds what GAS needs across a run: the radius r1 (one for all,
or one per class), the per-dimension noise and ascent step that scale with
it, and the adaptive shell factor of each class (``gas_shell = adaptive``,
updated after every epoch from held-out GAS rows, ``clad_shell``). It turns
normal rows into GAS rows (``losses.global_synthesis``) and jitters normal
rows by their class's radius. ``clad_train.CladTrainer`` owns one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from core import distributed
from core.files import seed_from, seeded
from stages.heads.base import TrainContext
from stages.heads.clad_model import CladModel
from stages.heads.clad_shell import (
    class_gas_auroc,
    class_nn_distances,
    median_nn_distance,
    rows_per_class,
    update_shell,
)
from stages.heads.rows import score_in_chunks
from stages.train.losses import global_synthesis, jitter_rows, partner_differences

if TYPE_CHECKING:
    from stages.heads.clad_settings import CladSettings

SHELL_ROWS = 2000  # held-out normal rows per class that measure an adaptive GAS shell


class GasRows:
    """GAS radii and shell of one run. ``val``: the held-out rows (normal ``[n, C]``,
    synthetic, image of each normal row), as ``labels.held_out_rows`` gives them.
    Rank 0 alone measures the radii and the shell; every rank gets the same numbers."""

    def __init__(self, t: CladSettings, ctx: TrainContext, val: tuple[np.ndarray, np.ndarray, np.ndarray]):
        self.t, self.ctx, self.device, self.val = t, ctx, ctx.device, val
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
        self.shell_rows = (rows_per_class(val[2], ctx.cache.image_class, n_classes, SHELL_ROWS,
                                          seeded(ctx.seed, "shell-rows")) if adaptive else {})

    @property
    def class_r1(self) -> torch.Tensor | None:
        """``[n_classes]`` r1 per class (None with one radius for all): the configured
        radius, times the class's adaptive shell factor (``gas_shell = adaptive``)."""
        if self.class_nn_r1 is None or self.shell is None:
            return self.class_nn_r1
        return self.class_nn_r1 * torch.from_numpy(self.shell).float()

    def summary(self) -> dict[str, Any]:
        """The radii for the run's ``train.json``."""
        r1 = self.class_r1
        return {"r1": self.r1, "r2": self.r2, "noise": self.noise, "eta": self.eta,
                "class_r1": None if r1 is None else r1.tolist()}

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

    def radii(self, image: torch.Tensor) -> tuple[Any, Any, Any]:
        """(r1, noise, eta) for rows of global images ``image`` ``[n]``: floats, or
        ``[n, 1]`` tensors with per-class radii (noise and step scale with r1)."""
        if self.class_r1 is None:
            return self.r1, self.noise, self.eta
        r1 = self.class_r1[self.class_of_image[image.cpu()]].to(self.device)[:, None]
        scale = r1 / self.r1
        return r1, self.noise * scale, self.eta * scale

    def synthesise(self, model: CladModel, x: torch.Tensor, image: torch.Tensor, pool: torch.Tensor | None = None,
                   pool_image: torch.Tensor | None = None, rows: tuple[int, int] | None = None,
                   label: torch.Tensor | None = None) -> torch.Tensor:
        """Global anomaly synthesis of normal rows ``x`` of images ``image`` (``losses.global_synthesis``
        against ``model``); with ``gas_direction = rows`` displaced along differences to rows of ``pool`` of
        the same class. ``rows``: only those rows of ``x`` are synthesised (the randomness is drawn for all).
        ``label`` ``[n]``: the rows' labels, which a score per class ascends on."""
        r1, noise, eta = self.radii(image)
        start = None
        if self.t.gas_direction == "rows":
            cls = self.class_of_image.to(x.device)
            pool, pool_image = (x, image) if pool is None else (pool, pool_image)
            start = partner_differences(x, cls[image], pool, cls[pool_image])
            r1, eta = r1 * self.t.gas_rows_scale, eta * self.t.gas_rows_scale
        return global_synthesis(model, x, r1, noise, eta, self.t.gas_steps, self.t.gas_project_every,
                                self.t.gas_bn, start, rows, label if self.t.score_heads == "class" else None)

    def jittered(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Normal rows ``x`` ``[B, C]`` plus Gaussian noise of expected norm ``normal_jitter`` x
        their class's r1 (``x`` itself when off; GAS starts from the rows without it)."""
        if not self.t.normal_jitter:
            return x
        return jitter_rows(x, self.radii(image)[0], self.t.normal_jitter)

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

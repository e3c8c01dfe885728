"""Resumable, phased epoch training shared by the trainable heads.

Every epoch ends with an atomic checkpoint (model, optimizer, phase, epoch,
best validation value, history, RNG state, cache and run keys, progress).
Each epoch reseeds torch's RNG from (seed, phase, epoch) and the head's data
stream is a function of (seed, epoch), so a run killed at any point and
resumed ends with bit-identical weights on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from core.errors import CladError, StaleError
from core.files import save_torch_atomic, seed_from
from stages.train.context import TrainContext


@dataclass(frozen=True)
class Phase:
    """One phase of training: ``epochs`` epochs; with ``select_best`` the model
    with the best ``select_by`` value of this phase (higher is better) is kept:
    the next phase starts from it with a fresh optimizer, and after the last
    phase it is the trained model."""

    name: str
    epochs: int
    select_best: bool = False
    select_by: str = "val_auroc"  # the record value that selects (higher is better)


RunEpoch = Callable[[int, Phase, int, torch.optim.Optimizer], dict[str, Any]]


class EpochLoop:
    """Runs ``phases`` for one model, resuming from ``ctx.files.latest``."""

    def __init__(self, ctx: TrainContext, phases: list[Phase]):
        self.ctx, self.phases = ctx, phases
        self.total = sum(p.epochs for p in phases)

    def _state(self, model: torch.nn.Module, opt: torch.optim.Optimizer, phase: int, epoch: int,
               best: float, history: list[dict[str, Any]]) -> dict[str, Any]:
        done = sum(p.epochs for p in self.phases[:phase]) + epoch
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "phase": phase, "epoch": epoch,
                "best": best, "history": history, "rng": torch.get_rng_state(),
                "cache_key": self.ctx.cache_key, "train_key": self.ctx.run_key, "progress": [done, self.total]}

    def run(self, model: torch.nn.Module, make_optimizer: Callable[[Phase], torch.optim.Optimizer],
            run_epoch: RunEpoch, on_phase: Callable[[Phase, int], None] | None = None) -> list[dict[str, Any]]:
        """Train to the end; returns the history (one record per epoch).

        ``run_epoch(phase_index, phase, epoch, optimizer)`` trains one epoch and
        returns its record (with ``phase.select_by`` where the phase selects);
        ``on_phase(phase, first_epoch)`` is called when a phase (re)starts.
        """
        ctx, files = self.ctx, self.ctx.files
        phase, epoch, best, history = 0, 0, -1.0, []
        opt = make_optimizer(self.phases[0])
        if files.latest.is_file():
            try:
                ck = torch.load(files.latest, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - truncated or damaged file
                raise CladError(f"{files.latest}: checkpoint cannot be read ({type(exc).__name__}); "
                                "train again with --restart") from None
            if ck["cache_key"] != ctx.cache_key or ck["train_key"] not in ctx.accepted_keys:
                raise StaleError(f"{files.latest}: checkpoint from another cache or configuration; "
                                 "use another --run name or --restart")
            phase, epoch, best, history = ck["phase"], ck["epoch"], ck["best"], ck["history"]
            model.load_state_dict(ck["model"])
            opt = make_optimizer(self.phases[min(phase, len(self.phases) - 1)])
            opt.load_state_dict(ck["optimizer"])
            ctx.log(f"train: resuming at {self.phases[min(phase, len(self.phases) - 1)].name} epoch {epoch}")
        while phase < len(self.phases):
            ph = self.phases[phase]
            if on_phase is not None and epoch < ph.epochs:
                on_phase(ph, epoch)
            bar = ctx.make_bar(ph.name, epoch, ph.epochs)
            while epoch < ph.epochs:
                torch.manual_seed(seed_from(ctx.seed, phase, epoch))
                model.train()
                rec = {"phase": ph.name, "epoch": epoch, **run_epoch(phase, ph, epoch, opt)}
                history.append(rec)
                epoch += 1
                val = rec.get(ph.select_by, float("nan"))
                if ph.select_best and not (val <= best):  # NaN counts as better than nothing
                    best = val if val == val else best
                    save_torch_atomic({"model": model.state_dict(), "epoch": epoch}, files.best(ph.name))
                save_torch_atomic(self._state(model, opt, phase, epoch, best, history), files.latest)
                bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k not in ("phase", "epoch")})
                bar.update(1)
            bar.close()
            phase, epoch = phase + 1, 0
            if ph.select_best and files.best(ph.name).is_file():  # the phase's selected model goes on
                model.load_state_dict(torch.load(files.best(ph.name), map_location="cpu", weights_only=True)["model"])
            if ph.select_best and phase < len(self.phases):
                best = -1.0  # each phase selects among its own epochs
                opt = make_optimizer(self.phases[phase])
                save_torch_atomic(self._state(model, opt, phase, 0, best, history), files.latest)
        return history

"""Resumable, phased epoch training shared by the trainable heads: the one training loop.

A head supplies a ``Trainable`` (its phases, optimizer, batches, the losses
of one batch, and what to record after an epoch); ``EpochLoop.fit`` owns the
epoch body: the learning-rate schedule, backward and optimizer step, the
weight average (``Schedule.ema``), loss averages and the rate, then the
epoch's record, the selection of the best epoch and the checkpoint.

Every epoch ends with an atomic checkpoint (model, optimizer, phase, epoch,
best validation value, history, RNG state, cache and run keys, progress).
Each epoch reseeds torch's RNG from (seed, phase, epoch) and the head's data
stream is a function of (seed, epoch), so a run killed at any point and
resumed ends with bit-identical weights on the CPU.

On several processes (``core.distributed``): each rank's losses are its part
of the one-process loss (their sum over ranks), so the backward is scaled by
the world size to undo ``DistributedDataParallel``'s averaging of gradients,
and the epoch's loss averages are summed over ranks. Rank 0 alone reads and
writes the checkpoints and shows progress; what it reads (a checkpoint to
resume, the selected model of a phase) is broadcast, and every epoch ends
with a barrier after its checkpoint, so a rank killed at any point leaves
rank 0's last checkpoint to resume from.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from core import distributed
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


@dataclass(frozen=True)
class Schedule:
    """What the loop does around every optimizer step.

    ``lr_schedule = cosine``: lr x (1 + cos(pi s / S)) / 2 at step s of a phase
    of S steps (a function of the step alone: a resumed run gets the same).
    ``ema > 0``: an exponential average of the weights (decay per step, warmed
    up as min(ema, (1 + t) / (10 + t)) so early steps do not keep the random
    initialisation) is what is probed, selected and kept; it is checkpointed
    beside the trained weights, and each later phase starts from it.
    """

    lr: float
    lr_schedule: str = "constant"  # constant | cosine
    ema: float = 0.0

    def lr_at(self, step: int, total: int) -> float:
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))
        return self.lr


class Trainable(Protocol):
    """What a head gives the loop (``stages.heads.clad``, ``stages.heads.rlr``)."""

    model: nn.Module  # the trained network
    schedule: Schedule
    rate_name: str  # key of the epoch's throughput in its record, e.g. "rows_per_s"

    def phases(self) -> list[Phase]: ...
    def optimizer(self, phase: Phase) -> torch.optim.Optimizer: ...
    def start_phase(self, phase: Phase, first_epoch: int) -> None: ...
    def batches_per_epoch(self, phase: Phase) -> int: ...
    def batches(self, phase: Phase, epoch: int) -> Iterable[Any]: ...
    def step(self, batch: Any, phase: Phase, epoch: int, index: int) -> dict[str, torch.Tensor]: ...
    def size(self, batch: Any) -> int: ...  # rows (or images) the batch trained on
    def end_epoch(self, phase: Phase, scored: nn.Module) -> dict[str, Any]: ...
    # optional: restore(history) on resuming, for state a head keeps in its epoch records


def backward(losses: dict[str, torch.Tensor]) -> None:
    """The backward of one step's losses. On several processes each rank's losses are its
    part of the one-process loss and DDP averages the ranks' gradients: the world size
    times the average is their sum, the one-process gradient."""
    world = distributed.world_size()
    if world > 1:
        (sum(losses.values()) * world).backward()
    else:
        sum(losses.values()).backward()


@torch.no_grad()
def update_average(average: nn.Module, model: nn.Module, decay: float) -> None:
    """``average <- decay * average + (1 - decay) * model`` on the parameters; buffers
    (batch-norm statistics) copied."""
    torch._foreach_lerp_(list(average.parameters()), list(model.parameters()), 1 - decay)
    for b_avg, b in zip(average.buffers(), model.buffers(), strict=True):
        b_avg.copy_(b)


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

    def fit(self, tr: Trainable) -> tuple[nn.Module, list[dict[str, Any]]]:
        """Train ``tr`` to the end: (the trained model, the history). The model is
        the weight average where ``tr.schedule.ema`` > 0, else ``tr.model``."""
        sched = tr.schedule
        average = copy.deepcopy(tr.model) if sched.ema > 0 else None
        scored = average if average is not None else tr.model
        # checkpointed: the bare model (the format of runs without an average), or both
        holder = tr.model if average is None else nn.ModuleDict({"net": tr.model, "ema": average})
        before = [sum(p.epochs for p in self.phases[:i]) for i in range(len(self.phases))]

        def run_epoch(i_phase: int, ph: Phase, epoch: int, opt: torch.optim.Optimizer) -> dict[str, Any]:
            sums: dict[str, float] = {}
            size, t0 = 0, time.perf_counter()
            n_b = tr.batches_per_epoch(ph)
            first_step = (before[i_phase] + epoch) * n_b
            world = distributed.world_size()
            for k, b in enumerate(tr.batches(ph, epoch)):
                if sched.lr_schedule != "constant":
                    for g in opt.param_groups:
                        g["lr"] = sched.lr_at(epoch * n_b + k, ph.epochs * n_b)
                losses = tr.step(b, ph, epoch, k)
                opt.zero_grad(set_to_none=True)
                backward(losses)
                opt.step()
                if average is not None:
                    t = first_step + k
                    update_average(average, tr.model, min(sched.ema, (1 + t) / (10 + t)))
                for name, v in losses.items():
                    sums[name] = sums.get(name, 0.0) + v.item()
                size += tr.size(b)
            rate = size / (time.perf_counter() - t0)
            if world > 1:  # each rank's losses are its part of the batch's: summed over ranks
                total = distributed.all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64,
                                                                device=_device_of(tr.model)))
                sums = dict(zip(sums, total.tolist(), strict=True))
            return {**{k: v / n_b for k, v in sums.items()}, **tr.end_epoch(ph, scored), tr.rate_name: rate}

        def on_phase(ph: Phase, first: int) -> None:
            tr.start_phase(ph, first)

        def next_phase() -> None:
            if average is not None:  # a later phase starts from the average
                tr.model.load_state_dict(average.state_dict())

        history = self.run(holder, tr.optimizer, run_epoch, on_phase, next_phase, getattr(tr, "restore", None))
        return scored, history

    def run(self, model: torch.nn.Module, make_optimizer: Callable[[Phase], torch.optim.Optimizer],
            run_epoch: RunEpoch, on_phase: Callable[[Phase, int], None] | None = None,
            next_phase: Callable[[], None] | None = None,
            on_resume: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
        """Train to the end; returns the history (one record per epoch).

        ``run_epoch(phase_index, phase, epoch, optimizer)`` trains one epoch and
        returns its record (with ``phase.select_by`` where the phase selects);
        ``on_phase(phase, first_epoch)`` is called when a phase (re)starts;
        ``next_phase()`` after a phase's selected model is loaded, before the next one starts;
        ``on_resume(history)`` when a checkpoint is resumed (state a head derives from its records).
        """
        ctx, files = self.ctx, self.ctx.files
        main = distributed.is_main()
        phase, epoch, best, history = 0, 0, -1.0, []
        opt = make_optimizer(self.phases[0])
        ck = distributed.on_main(self._resumable)  # rank 0 reads it; every rank resumes from it
        if ck is not None:
            phase, epoch, best, history = ck["phase"], ck["epoch"], ck["best"], ck["history"]
            model.load_state_dict(ck["model"])
            opt = make_optimizer(self.phases[min(phase, len(self.phases) - 1)])
            opt.load_state_dict(ck["optimizer"])
            ctx.log(f"train: resuming at {self.phases[min(phase, len(self.phases) - 1)].name} epoch {epoch}")
            if on_resume is not None:
                on_resume(history)
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
                    if main:
                        save_torch_atomic({"model": model.state_dict(), "epoch": epoch}, files.best(ph.name))
                if main:
                    save_torch_atomic(self._state(model, opt, phase, epoch, best, history), files.latest)
                distributed.barrier()  # no rank starts the next epoch before this one's checkpoint is whole
                bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items()
                                 if k not in ("phase", "epoch") and isinstance(v, (int, float))})
                bar.update(1)
            bar.close()
            phase, epoch = phase + 1, 0
            if ph.select_best:  # the phase's selected model goes on
                name = files.best(ph.name)
                state = distributed.on_main(lambda name=name: torch.load(name, map_location="cpu", weights_only=True)
                                            ["model"] if name.is_file() else None)
                if state is not None:
                    model.load_state_dict(state)
            if next_phase is not None and phase < len(self.phases):
                next_phase()
            if ph.select_best and phase < len(self.phases):
                best = -1.0  # each phase selects among its own epochs
                opt = make_optimizer(self.phases[phase])
                if main:
                    save_torch_atomic(self._state(model, opt, phase, 0, best, history), files.latest)
                distributed.barrier()
        return history

    def _resumable(self) -> dict[str, Any] | None:
        """The run's last checkpoint (checked against the cache and the run key), None if there is none."""
        ctx, files = self.ctx, self.ctx.files
        if not files.latest.is_file():
            return None
        try:
            ck = torch.load(files.latest, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated or damaged file
            raise CladError(f"{files.latest}: checkpoint cannot be read ({type(exc).__name__}); "
                            "train again with --restart") from None
        if ck["cache_key"] != ctx.cache_key or ck["train_key"] not in ctx.accepted_keys:
            raise StaleError(f"{files.latest}: checkpoint from another cache or configuration; "
                             "use another --run name or --restart")
        return ck


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")

"""Training on several processes (torch's own launcher, ``torchrun``): who am I, and the few
collectives the heads' training needs. Without a launcher (one process) every function
here is the identity or a constant and nothing of ``torch.distributed`` is touched.

The scheme (``stages.heads.clad``): every rank reads the same global batch from the
stream and computes on its own contiguous share of its rows (``share``); gradients are
summed by ``DistributedDataParallel``; batch norm, the contrastive and the variance
losses see all rows through ``all_reduce_sum`` / ``all_gather_rows``, whose gradients
flow back to the rank that owns each row. Rank 0 alone reads and writes the run's
files and decides; what it decides reaches the others through ``on_main``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# rank 0 works alone between collectives (the probe, calibration); the others wait this long
TIMEOUT = timedelta(hours=2)


def launched() -> bool:
    """Started by a launcher with more than one process (``WORLD_SIZE`` > 1)?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Is a process group of more than one process initialised?"""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a launcher); the launcher's ``RANK`` before ``init_from_env``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that writes files, logs and shows progress."""
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the launcher's process group (NCCL on a GPU, gloo on the CPU) when ``WORLD_SIZE`` > 1;
    returns the device of this rank (``cuda:LOCAL_RANK`` on GPUs). Idempotent."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def close() -> None:
    """Leave the process group (at the end of a distributed command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def share(n: int, of: int | None = None, world: int | None = None) -> tuple[int, int]:
    """Rank ``of``'s (default this one's) contiguous slice ``(first, last)`` of ``n`` rows:
    ``n // world`` each, the first ``n % world`` ranks one more."""
    r = rank() if of is None else of
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    first = r * base + min(r, extra)
    return first, first + base + (r < extra)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` (gradients averaged over ranks in the backward),
    without its per-forward copy of rank 0's buffers: batch-norm statistics computed from
    global sums are the same on every rank already."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # newer torch names the switch forward_sync_buffers (and deprecates broadcast_buffers)
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
            else "broadcast_buffers")
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, **{sync: False})


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; every rank's output depends on every rank's input, so the
    gradient is the sum over ranks of the output gradients."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, D102
        y = x.clone().contiguous()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, D102
        g = grad.clone().contiguous()
        dist.all_reduce(g)
        return g


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over ranks (differentiable); ``x`` itself in one process."""
    return _AllReduceSum.apply(x) if active() else x


def _sizes(n: int, device: torch.device) -> list[int]:
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(s) for s in out]


class _GatherRows(torch.autograd.Function):
    """Rows of every rank concatenated in rank order (padded to the largest share for the
    collective); the gradient of a row comes back, summed over ranks, to the rank that owns it."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, D102
        sizes = _sizes(len(x), x.device)
        top = max(sizes)
        padded = x.new_zeros((top, *x.shape[1:]))
        padded[: len(x)] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        first = sum(sizes[: dist.get_rank()])
        ctx.rows = (first, first + len(x))
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, D102
        g = grad.clone().contiguous()
        dist.all_reduce(g)
        first, last = ctx.rows
        return g[first:last]


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``[n_r, ...]`` on each rank -> ``[sum n_r, ...]`` (rank order) on every rank; differentiable
    for floating tensors (any dtype otherwise, without a graph); ``x`` itself in one process."""
    if not active():
        return x
    if x.is_floating_point() and x.requires_grad:
        return _GatherRows.apply(x)
    with torch.no_grad():
        return _GatherRows.forward(_NoCtx(), x)


class _NoCtx:
    """Stands in for autograd's ctx when gathering without a graph."""


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; tensors travel inside); ``obj`` in one process."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class Failed(SystemExit):
    """Raised on the other ranks when what rank 0 did for all of them failed there (rank 0
    reports it; the others leave quietly with exit code 2)."""

    def __init__(self) -> None:
        super().__init__(2)


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 alone, its result on every rank (``fn()`` in one process).
    An exception on rank 0 is raised there and ends the other ranks quietly (``Failed``)."""
    if not active():
        return fn()
    if is_main():
        try:
            value = fn()
        except BaseException:
            broadcast_object((False, None))
            raise
        broadcast_object((True, value))
        return value
    ok, value = broadcast_object(None)
    if not ok:
        raise Failed
    return value


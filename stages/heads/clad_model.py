"""CLAD's networks (seed 001), apart from their training (``stages.heads.clad``):
the adaptor, the discriminator with its two heads, batch norm over the global
batch of a distributed run (``BatchNorm1d``), and batch norm's statistics
re-estimated on a sample (``precise_batch_norm``).
"""

from __future__ import annotations

import torch
from torch import nn

from core import distributed


class BatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics are those of the global batch when the
    rows are spread over several processes (``core.distributed``): the per-rank sums and
    centred sums of squares are summed over ranks (differentiable), so every rank
    normalises with, and keeps running statistics of, all the batch's rows. In one
    process, or in eval mode, it is ``nn.BatchNorm1d`` itself; its parameters, buffers
    and state-dict keys are ``nn.BatchNorm1d``'s (checkpoints load either way).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed.active()):
            return super().forward(x)
        stats = distributed.all_reduce_sum(torch.cat([x.sum(0), x.new_full((1,), float(len(x)))]))
        n = float(stats[-1].detach())
        mean = stats[:-1] / n
        var = distributed.all_reduce_sum(((x - mean) ** 2).sum(0)) / n  # biased, as batch norm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * (n / max(n - 1, 1.0)), factor)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def _mlp(dims: list[int], last_plain: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if not (last_plain and i == len(dims) - 2):
            layers += [BatchNorm1d(b), nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers)


class Adaptor(nn.Module):
    """3-layer MLP with batch norm reducing C_d (e.g. 360 -> 1024 -> 512 -> 256)."""

    def __init__(self, in_dim: int, dims: tuple[int, ...] = (1024, 512, 256)):
        super().__init__()
        self.net = _mlp([in_dim, *dims], last_plain=True)
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_d]`` -> ``[B, dims[-1]]``."""
        return self.net(x)


class Discriminator(nn.Module):
    """3-layer MLP with two heads: N+1 class logits (classes + anomaly) and a raw score."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 1024):
        super().__init__()
        self.n_classes = n_classes
        self.net = _mlp([in_dim, hidden, hidden, n_classes + 2], last_plain=True)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, D]`` -> (logits ``[B, N+1]``, anomaly score ``[B]``; high = anomalous)."""
        out = self.net(z)
        return out[:, :-1], out[:, -1]


class CladModel(nn.Module):
    """Adaptor + discriminator; ``score`` gives per-patch anomaly scores."""

    def __init__(self, in_dim: int, n_classes: int, adaptor_dims: tuple[int, ...], hidden: int):
        super().__init__()
        self.adaptor = Adaptor(in_dim, adaptor_dims)
        self.disc = Discriminator(adaptor_dims[-1], n_classes, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.adaptor(x)
        logits, s = self.disc(z)
        return z, logits, s

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, C_d]`` -> ``[n]`` anomaly scores (eval mode)."""
        return self.forward(x)[2]


@torch.no_grad()
def precise_batch_norm(model: nn.Module, chunks: list[torch.Tensor]) -> None:
    """Set every batch-norm layer's running statistics to the average over
    ``chunks`` (each ``[b, C_d]``, composed like a training batch) of the
    batch statistics a training forward computes (momentum=None: a
    cumulative average), instead of the exponential average of the last ~10
    training batches. Those come from the last windows of shards, i.e. from
    a few classes, and evaluation of every class normalises with them.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    was_training = model.training
    model.train()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    for x in chunks:
        model(x)
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    model.train(was_training)

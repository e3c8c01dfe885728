"""CLAD's networks (seed 001), apart from their training (``stages.heads.clad``):
the adaptor, the discriminator with its two heads, batch norm over the global
batch of a distributed run (``BatchNorm1d``), and batch norm's statistics
re-estimated on a sample (``precise_batch_norm``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from core import distributed

if TYPE_CHECKING:
    from stages.heads.clad_settings import CladSettings


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
    """3-layer MLP with two heads: N+1 class logits (classes + anomaly) and
    ``n_scores`` raw scores (1: one for every class, the paper; N: one per class)."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 1024, n_scores: int = 1):
        super().__init__()
        self.n_classes, self.n_scores = n_classes, n_scores
        self.net = _mlp([in_dim, hidden, hidden, n_classes + 1 + n_scores], last_plain=True)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, D]`` -> (logits ``[B, N+1]``, anomaly scores ``[B, n_scores]``; high = anomalous)."""
        out = self.net(z)
        return out[:, :self.n_classes + 1], out[:, self.n_classes + 1:]


def pick_scores(scores: torch.Tensor, label: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """``[B, n_scores]`` -> ``[B]``: the only column, or each row's column of ``label``
    ``[B]`` (long); without labels, of its most likely normal class (``logits``
    ``[B, N+1]``, the anomaly logit left out)."""
    if scores.shape[1] == 1:
        return scores[:, 0]
    if label is None:
        label = logits[:, :scores.shape[1]].argmax(1)
    return scores.gather(1, label[:, None])[:, 0]


def image_classes(logits: torch.Tensor) -> torch.Tensor:
    """``[n, H*W, N+1]`` logits of each image's patches -> ``[n]`` (long): the normal
    class with the highest mean probability over the image's patches (the anomaly
    class left out): how a model with a score per class routes an image."""
    n_classes = logits.shape[-1] - 1
    return torch.softmax(logits[..., :n_classes], dim=-1).mean(1).argmax(1)


class CladModel(nn.Module):
    """Adaptor + discriminator; ``score`` gives per-patch anomaly scores.

    ``score_heads = "class"``: the discriminator has one score output per label
    (class or pseudo-class), trained on that label's normal rows against the
    synthetic rows made from them; a row is scored by the column of its label in
    training, of its image's class (``image_classes``) when whole maps are scored.
    """

    def __init__(self, in_dim: int, n_classes: int, adaptor_dims: tuple[int, ...], hidden: int,
                 score_heads: str = "one"):
        super().__init__()
        self.adaptor = Adaptor(in_dim, adaptor_dims)
        self.disc = Discriminator(adaptor_dims[-1], n_classes, hidden, n_classes if score_heads == "class" else 1)
        self.space: Adaptor | None = None  # a second adaptor some classes measure the mix's d after (set_space)

    def set_space(self, space: Adaptor | None, classes: list[int] | None = None) -> None:
        """Measure the score mix's distance d of the labels ``classes`` after ``space`` (frozen,
        eval mode; ``train.clad.score_mix_space``: the contrastive phase's adaptor) instead of
        ``adaptor``. Its weights and ``space_classes`` (``[N]`` int64, 1 = the label uses it)
        are part of the state dict; ``None`` removes both."""
        if space is None:
            self.space = None
            self._buffers.pop("space_classes", None)
            return
        self.space = space.to(next(self.adaptor.parameters()).device).eval()
        for p in space.parameters():
            p.requires_grad_(False)
        flags = torch.zeros(self.disc.n_classes, dtype=torch.int64)
        flags[list(classes or [])] = 1
        self.register_buffer("space_classes", flags.to(next(self.adaptor.parameters()).device))

    def space_for(self, label: int | None) -> nn.Module:
        """The module whose outputs label ``label``'s d is measured in (the adaptor without a space)."""
        if label is not None and self.space is not None and int(self.space_classes[label]):
            return self.space
        return self.adaptor

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, C_d]`` (and ``[B]`` labels, for a score per class) -> (embeddings
        ``[B, D]``, logits ``[B, N+1]``, scores ``[B]``)."""
        z = self.adaptor(x)
        logits, scores = self.disc(z)
        return z, logits, pick_scores(scores, label, logits)

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, C_d]`` -> ``[n]`` anomaly scores (eval mode; each row by its own most likely class)."""
        return self.forward(x)[2]

    @torch.no_grad()
    def score_images(self, maps: torch.Tensor) -> torch.Tensor:
        """``[n, H*W, C_d]`` -> ``[n, H*W]`` anomaly scores (eval mode): every
        patch of an image scored by the column of the image's class."""
        return self.image_parts(maps, space=False)[1]

    def image_parts(self, maps: torch.Tensor, space: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[n, H*W, C_d]`` -> (each image's rows in its class's d space ``[n, H*W, D]``
        (``space_for``), scores ``[n, H*W]`` by the column of each image's class
        (``image_classes``), normal-class probabilities ``[n, H*W, N]``): what whole-map scoring
        and the score mix (``clad_mix``) read. ``space=False``: the adaptor's outputs even where
        a d space is set (the scores alone need no second adaptor)."""
        n, hw = maps.shape[0], maps.shape[1]  # sizes the ONNX tracer keeps symbolic
        z, logits, scores = (t.reshape(n, hw, -1) for t in self._outputs(maps.reshape(n * hw, -1)))
        probs = torch.softmax(logits[..., :logits.shape[-1] - 1], dim=-1)
        if space and self.space is not None:  # the image's class (image_classes) says which space
            in_space = self.space_classes[probs.mean(1).argmax(1)] > 0
            z = torch.where(in_space[:, None, None], self.space(maps.reshape(n * hw, -1)).reshape(n, hw, -1), z)
        if self.disc.n_scores == 1:
            return z, scores[..., 0], probs
        cls = probs.mean(1).argmax(1)  # image_classes
        return z, scores.gather(2, cls[:, None, None].expand(n, hw, 1))[..., 0], probs

    def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.adaptor(x)
        logits, scores = self.disc(z)
        return z, logits, scores


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


def build_model(in_dim: int, n_labels: int, t: CladSettings) -> CladModel:
    """The network ``t`` describes, for ``in_dim`` features and ``n_labels`` labels (random weights)."""
    return CladModel(in_dim, n_labels, t.adaptor_dims, t.disc_hidden, t.score_heads)

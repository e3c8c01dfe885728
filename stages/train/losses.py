"""CLAD's losses as pure torch functions (paper eqs. 8-23; docs/METHOD.md section 2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stages.search import squared_distances

PAIR_BLOCK = 1024  # rows of the B x B distance matrix computed at a time
WEIGHT_FLOOR = 1e-6


def focal_weight(loss: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Eqs. 13-14: ``alpha * (1 - exp(-L))^gamma``.

    With gamma < 0 the weight is infinite at L = 0 and ``inf * 0`` would give
    NaN for every masked-out pair. The base is floored at 1e-6 so the weight
    stays finite (w * L = 0 exactly where L = 0); it stays in the graph, so
    near 0 the term behaves like alpha * L^(1 + gamma).
    """
    return alpha * torch.clamp(1 - torch.exp(-loss), min=WEIGHT_FLOOR) ** gamma


def contrastive_reference(z: torch.Tensor, labels: torch.Tensor, margin: float = 1.0,
                          alpha: float = 1.0, gamma: float = -0.8,
                          pair_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eqs. 8-17 written out on the full B x B matrices (small B; the tests' reference)."""
    b = z.shape[0]
    d2 = squared_distances(z, z)
    dist = torch.sqrt(torch.clamp(d2, min=1e-12))  # eq. 8
    eq = labels[:, None] == labels[None]  # eq. 9
    not_self = ~torch.eye(b, dtype=torch.bool, device=z.device)
    pos = dist * (eq & not_self)  # eq. 11
    neg = F.relu(margin - dist) * ~eq  # eq. 12
    total = focal_weight(pos, alpha, gamma) * pos + focal_weight(neg, alpha, gamma) * neg  # 15-16
    if pair_mask is not None:
        total = total * (pair_mask[:, None] & pair_mask[None])
    return total.sum() / (b * b)  # eq. 17


def _block_value_and_grad(zb: torch.Tensor, z: torch.Tensor, lb: torch.Tensor, labels: torch.Tensor,
                          start: int, margin: float, alpha: float, gamma: float,
                          mask_b: torch.Tensor | None, mask: torch.Tensor | None, need_grad: bool
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of f(L_ij) over a block of rows, and dSum/dd2_ij (``[blk, B]``).

    Positive and negative terms never overlap (a pair is one or the other),
    so one loss matrix L and one focal weight serve both: f(L) = w(L) L.
    """
    d2 = squared_distances(zb, z)
    live = d2 > 1e-12
    dist = torch.sqrt(torch.clamp(d2, min=1e-12))
    eq = lb[:, None] == labels[None]
    rows = torch.arange(zb.shape[0], device=z.device)
    eq[rows, rows + start] = False  # the diagonal is neither a positive nor a negative pair
    is_neg = lb[:, None] != labels[None]
    loss = torch.where(eq, dist, torch.where(is_neg, F.relu(margin - dist), torch.zeros_like(dist)))
    raw = -torch.expm1(-loss)  # 1 - exp(-L)
    floored = raw < WEIGHT_FLOOR
    u = torch.clamp(raw, min=WEIGHT_FLOOR)
    w = alpha * u**gamma
    f = w * loss
    pair_w = None
    if mask is not None:
        pair_w = (mask_b[:, None] & mask[None]).to(z.dtype)
        f = f * pair_w
    value = f.sum()
    if not need_grad:
        return value, None
    # d f / d L = w + L * dw/dL, with dw/dL = alpha * gamma * u^(gamma-1) * exp(-L) (0 where floored)
    dfdl = w + torch.where(floored, torch.zeros_like(w), gamma * w / u * (1 - raw) * loss)
    sign = torch.where(eq, torch.ones_like(dist),
                       torch.where(is_neg & (dist < margin), -torch.ones_like(dist), torch.zeros_like(dist)))
    g = dfdl * sign * live / (2 * dist)  # dD/dd2 = 1 / (2D) where d2 was not clamped
    if pair_w is not None:
        g = g * pair_w
    return value, g


class _Contrastive(torch.autograd.Function):
    """Eq. 17 with its gradient accumulated block by block during the forward pass.

    Peak memory is a few ``[block, B]`` matrices and one ``[B, D]`` gradient;
    the B x B matrices are never whole and nothing is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, z, labels, margin, alpha, gamma, pair_mask, block, rows):  # noqa: ANN001, D102
        b = z.shape[0]
        first, last = (0, b) if rows is None else rows
        need = ctx.needs_input_grad[0]
        total = z.new_zeros(())
        grad = torch.zeros_like(z) if need else None
        for s in range(first, last, block):
            e = min(s + block, last)
            zb = z[s:e]
            mb = pair_mask[s:e] if pair_mask is not None else None
            v, g = _block_value_and_grad(zb, z, labels[s:e], labels, s, margin, alpha, gamma,
                                         mb, pair_mask, need)
            total = total + v
            if need:
                # d2_ij = |z_i|^2 + |z_j|^2 - 2 z_i.z_j, for rows i of the block and all j
                grad[s:e] += 2 * g.sum(1, keepdim=True) * zb - 2 * g @ z
                grad += 2 * g.sum(0)[:, None] * z - 2 * g.T @ zb
        ctx.save_for_backward(grad if need else None)
        return total / (b * b)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, D102
        (grad,) = ctx.saved_tensors
        b = grad.shape[0]
        return grad * grad_out / (b * b), None, None, None, None, None, None, None


def contrastive_loss(z: torch.Tensor, labels: torch.Tensor, margin: float = 1.0, alpha: float = 1.0,
                     gamma: float = -0.8, pair_mask: torch.Tensor | None = None,
                     block: int = PAIR_BLOCK, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Eq. 17: weighted pair losses summed over the batch, divided by B^2.

    ``z`` ``[B, D]``, ``labels`` ``[B]`` long. Computed ``block`` rows at a time
    with an analytic gradient (``_Contrastive``), so peak memory is O(block * B)
    and never B x B x D. ``pair_mask`` ``[B]`` bool (optional) keeps only pairs
    whose both rows are set (the "normal pairs only" reading of eq. 11).
    ``rows = (first, last)``: only the pairs whose first row is one of
    ``z[first:last]`` (still divided by B^2, gradient for all of ``z``); the
    values over a partition of the rows sum to the whole loss (a distributed
    run: each process its own rows against every gathered row).
    """
    return _Contrastive.apply(z, labels, margin, alpha, gamma, pair_mask, block, rows)


def variance_loss(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eqs. 18-19: mean over labels (with >= 2 rows) of mean ||z - mu_c||^2."""
    terms = []
    for c in torch.unique(labels):
        zc = z[labels == c]
        if zc.shape[0] >= 2:
            terms.append(((zc - zc.mean(0)) ** 2).sum(1).mean())
    return torch.stack(terms).mean() if terms else z.new_zeros(())


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 20: cross-entropy (batch mean)."""
    return F.cross_entropy(logits, labels)


def hinge_loss(score: torch.Tensor, is_anomaly: torch.Tensor, delta: float = 0.5) -> torch.Tensor:
    """Eqs. 21-23: anomalies pushed to s >= delta, normals to s <= -delta (mean over rows)."""
    a = is_anomaly.bool()
    per_row = torch.where(a, F.relu(delta - score), F.relu(score + delta))
    return per_row.mean()


def bce_score_loss(score: torch.Tensor, is_anomaly: torch.Tensor) -> torch.Tensor:
    """GLASS' objective on the raw score: BCE(sigmoid(s), label), mean over rows.

    Unlike the hinge it never goes flat: normal rows keep being ranked by how
    normal they look, which is what pixel-level ranking metrics reward.
    """
    a = is_anomaly.bool()
    return torch.where(a, F.softplus(-score), F.softplus(score)).mean()


def score_loss(score: torch.Tensor, is_anomaly: torch.Tensor, kind: str, delta: float) -> torch.Tensor:
    """The discrimination loss L_d: ``hinge`` (eqs. 21-23) or ``bce`` (GLASS)."""
    if kind == "hinge":
        return hinge_loss(score, is_anomaly, delta)
    if kind == "bce":
        return bce_score_loss(score, is_anomaly)
    raise ValueError(f"score loss {kind!r}: choose hinge or bce")


def gas_ascent_loss(score: torch.Tensor) -> torch.Tensor:
    """GLASS' BCE(sigmoid(s), 1) = softplus(-s); ascending it makes features look normal."""
    return F.softplus(-score).mean()


def jitter_rows(x: torch.Tensor, r1: float | torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` ``[B, C]`` plus isotropic Gaussian noise whose expected squared norm is
    ``(factor * r1)^2`` (per dimension ``factor * r1 / sqrt(C)``; ``r1`` a float or ``[B, 1]``)."""
    return x + (factor * r1 / math.sqrt(x.shape[1])) * torch.randn_like(x)


def project_shell(x_g: torch.Tensor, x: torch.Tensor, r1: float | torch.Tensor,
                  r2: float | torch.Tensor) -> torch.Tensor:
    """Project ``x_g`` so that ``r1 <= ||x_g - x|| <= r2`` per row (GLASS manifold mode).

    ``r1``, ``r2``: floats, or ``[B, 1]`` tensors (a radius per row, e.g. per class).
    """
    h = x_g - x
    norm = h.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x + h * (norm.clamp(r1, r2) / norm)


def partner_differences(x: torch.Tensor, group: torch.Tensor, pool: torch.Tensor | None = None,
                        pool_group: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, C]``: for each row of ``x`` the difference ``p - x`` to a random row ``p``
    of ``pool`` (default ``x``) in the same ``group`` (a class); zero where the
    group has no other row. A direction in which the class's own features vary,
    unlike isotropic noise, whose energy sits mostly in directions no normal
    feature ever moves in (an easy shortcut for a discriminator).

    Uses torch's global RNG (seeded per epoch by the training loop).
    """
    pool = x if pool is None else pool
    pool_group = group if pool_group is None else pool_group
    order = torch.argsort(pool_group.double() + torch.rand(len(pool), dtype=torch.float64, device=pool.device))
    sorted_group = pool_group[order]
    starts = torch.searchsorted(sorted_group, group)
    ends = torch.searchsorted(sorted_group, group, right=True)
    count = ends - starts
    pick = starts + (torch.rand(len(x), device=x.device) * count.clamp_min(1)).long().clamp_max(
        (count - 1).clamp_min(0))
    partner = pool[order[pick.clamp_max(len(pool) - 1)]]
    diff = partner - x
    return torch.where((count > 0)[:, None], diff, torch.zeros_like(diff))


def global_synthesis(model: torch.nn.Module, x: torch.Tensor, r1: float | torch.Tensor, noise: float | torch.Tensor,
                     eta: float | torch.Tensor, steps: int, project_every: int, bn: str = "eval",
                     start: torch.Tensor | None = None, rows: tuple[int, int] | None = None,
                     label: torch.Tensor | None = None) -> torch.Tensor:
    """GAS (GLASS manifold mode): ``x`` ``[B, C]`` normal rows -> ``[B, C]`` synthetic
    rows with ``r1 <= ||x_g - x|| <= 2 r1``: Gaussian noise, ``steps`` normalised
    gradient-ascent steps of size ``eta`` on ``gas_ascent_loss`` (toward "looks
    normal": hard negatives), projected every ``project_every`` steps and at the end.

    ``model(x)[2]`` is the raw anomaly score. ``r1``, ``noise``, ``eta``: floats
    or ``[B, 1]`` tensors (per-row radii). ``bn = "eval"``: the ascent's
    forwards use batch norm's running statistics (what evaluation uses) and
    leave them alone; ``"train"`` (GLASS) normalises with the perturbed rows'
    own batch statistics and moves the running ones toward them at every
    step. The model is left in train mode. ``start`` ``[B, C]`` (optional):
    the initial displacement instead of Gaussian noise (e.g. ``partner_differences``),
    projected onto the shell like the noise.

    ``rows = (first, last)``: the noise is drawn for all of ``x`` (the same random
    numbers as without), then only rows ``first:last`` ascend and are returned
    (``[last - first, C]``): a distributed run's share, whose ascent loss is
    divided by all of ``x``'s rows so that, where batch norm couples rows
    (``bn = "train"``), every process weighs them as one process would.
    ``label`` ``[B]`` (optional): passed to ``model(x_g, label)``, a model with a score per class.
    """
    r2 = 2 * r1
    if bn == "eval":
        model.eval()
    x_g = x + noise * torch.randn_like(x)
    if start is not None:  # rows without a partner (a zero difference) keep the noise
        x_g = torch.where(start.norm(dim=1, keepdim=True) > 0, project_shell(x + start, x, r1, r2), x_g)
    n_all = len(x)
    if rows is not None:
        first, last = rows
        x, x_g = x[first:last], x_g[first:last]
        r1, eta = (v[first:last] if torch.is_tensor(v) else v for v in (r1, eta))
        label = None if label is None else label[first:last]
        r2 = 2 * r1
    for step in range(1, steps + 1):
        x_g = x_g.detach().requires_grad_(True)
        s = model(x_g)[2] if label is None else model(x_g, label)[2]
        loss = gas_ascent_loss(s) if rows is None else F.softplus(-s).sum() / n_all
        (grad,) = torch.autograd.grad(loss, x_g)
        x_g = x_g + eta * grad / (grad.norm(dim=1, keepdim=True) + 1e-10)
        if step % project_every == 0 or step == steps:
            x_g = project_shell(x_g, x, r1, r2)
    model.train()
    return project_shell(x_g.detach(), x, r1, r2)

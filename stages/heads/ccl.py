"""Class-aware contrastive learning (CCL, seed 002: Fan et al.) as pure torch functions.

All similarities are cosine (eq. 1's "·"), divided by the temperature tau.
Eq. 1 (supervised contrastive loss) for an anchor i with positives P(i) and
contrast set A(i)::

    L_scl(i) = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / tau) / sum_{a in A(i)} exp(s_ia / tau) )
             = -mean_{p in P(i)} s_ip / tau + logsumexp_{a in A(i)} s_ia / tau

- ``local_ccl_loss`` (eqs. 2-4): anchors are the positions of each image's
  projected map. For anchor (i, y, x) and every *other* image j of the same
  label, the positive is j's most similar feature inside the k x k window
  around (y, x) (eqs. 2-3; the argmax is taken with the similarity itself, so
  the gradient flows through the chosen pair). ``negatives="all"`` (the
  paper's "all other spatial features"): A = every position of every image
  in the batch except the anchor itself; ``"window"``: only the k x k window
  around (y, x) in every image (cheaper: O(B^2 HW k^2) instead of O((B HW)^2)).
  Eq. 4: mean over an image's positions, then summed over images.
- ``global_ccl_loss`` (eq. 5): anchors are pooled image features; P = other
  images of the same label, A = all other images; summed over images.
- ``ccl_loss`` (eq. 6 without the model's own loss): lambda1 * local + lambda2 * global.

An anchor without positives (the only image of its label in the batch) has
no eq. 1 term and is left out; pass a feature view of every image (same
label) to give each image at least one positive, as the paper's augmented
view does. ``reduction="sum"`` is eqs. 4-5 as written (grows with the batch);
``"mean"`` divides by the number of anchor images that have positives.

``feature_view`` is our equivalent of the paper's image augmentation on
cached features (docs/HEADS-RLR-CCL.md): a shift of at most ``max_shift``
cells (edges replicated), an optional horizontal flip, and UniAD/RLR-style
feature jitter (noise of std ``jitter * ||f|| / C`` per channel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TAU = 0.1  # seed 002 sec. 4.1 and Table 7 (best of 0.05-0.2)
LAMBDA1 = 1.0  # lambda1 : lambda2 = 1 : 1, seed 002 Table 7
LAMBDA2 = 1.0
CONTRAST_BLOCK = 2048  # anchors per block of the "all" contrast matrix


def window_neighbors(grid: tuple[int, int], k: int, device: torch.device | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx ``[H*W, k*k]`` long, valid ``[H*W, k*k]`` bool): the k x k window around each position.

    Row-major positions; offsets outside the grid are marked invalid (their
    idx points at the position itself, never used). ``k`` must be odd.
    """
    if k < 1 or k % 2 == 0:
        raise ValueError(f"k={k}: the window side must be an odd number >= 1")
    h, w = grid
    r = k // 2
    y = torch.arange(h, device=device).repeat_interleave(w)[:, None]
    x = torch.arange(w, device=device).repeat(h)[:, None]
    d = torch.arange(-r, r + 1, device=device)
    ny = (y + d.repeat_interleave(k)[None])
    nx = (x + d.repeat(k)[None])
    valid = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    idx = torch.where(valid, ny * w + nx, y * w + x)
    return idx, valid


def _window_max(fa: torch.Tensor, fj: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor,
                block: int) -> torch.Tensor:
    """``[B, N]``: max over the window of ``fa[b, n] . fj[idx[n, :]]`` (positions in blocks: bounded memory)."""
    out = []
    for s in range(0, idx.shape[0], block):
        nb = fj[idx[s:s + block]]  # [n, K, D]
        sim = torch.einsum("bnd,nkd->bnk", fa[:, s:s + block], nb)
        out.append(sim.masked_fill(~valid[s:s + block], float("-inf")).amax(-1))
    return torch.cat(out, 1)


def _reduce(per_image: torch.Tensor, has_pos: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction {reduction!r}: choose sum or mean")
    total = (per_image * has_pos).sum()
    return total if reduction == "sum" else total / has_pos.sum().clamp_min(1)


def local_ccl_loss(f: torch.Tensor, labels: torch.Tensor, k: int, tau: float = TAU, negatives: str = "all",
                   reduction: str = "sum", anchors: torch.Tensor | None = None) -> torch.Tensor:
    """Eqs. 2-4 on projected maps ``f`` ``[B, H, W, D]`` with ``labels`` ``[B]``; a scalar.

    ``anchors`` (optional ``[M]`` long positions, shared by all images): only
    these positions are anchors (an unbiased estimate of eq. 4's mean over
    positions; contrast sets still use every position).
    """
    if negatives not in ("all", "window"):
        raise ValueError(f"negatives {negatives!r}: choose all or window")
    b, h, w, _ = f.shape
    n = h * w
    fn = F.normalize(f.reshape(b, n, -1), dim=-1)
    idx, valid = window_neighbors((h, w), k, f.device)
    pos_at = torch.arange(n, device=f.device) if anchors is None else anchors
    idx, valid, fa = idx[pos_at], valid[pos_at], fn[:, pos_at]
    m = len(pos_at)
    block = max(1, 4_000_000 // max(1, idx.shape[1] * fn.shape[-1]))
    same = (labels[:, None] == labels[None]) & ~torch.eye(b, dtype=torch.bool, device=f.device)
    n_pos = same.sum(1)
    pos_sum = f.new_zeros(b, m)
    for j in range(b):
        if same[:, j].any():
            pos_sum = pos_sum + _window_max(fa, fn[j], idx, valid, block) * same[:, j, None]
    mean_pos = pos_sum / n_pos.clamp_min(1)[:, None]
    if negatives == "window":
        lse = []
        for j in range(b):  # window sims to every image; the anchor's own position is not in A
            sim = torch.einsum("bnd,nkd->bnk", fa, fn[j][idx]) / tau
            not_self = valid[None] & ~((torch.arange(b, device=f.device) == j)[:, None, None]
                                       & (idx == pos_at[:, None])[None])
            lse.append(sim.masked_fill(~not_self, float("-inf")))
        lse = torch.cat(lse, -1).logsumexp(-1)
    else:
        flat = fn.reshape(b * n, -1)
        anchor_rows = (torch.arange(b, device=f.device)[:, None] * n + pos_at[None]).reshape(-1)
        parts = []
        for s in range(0, len(anchor_rows), CONTRAST_BLOCK):
            rows = anchor_rows[s:s + CONTRAST_BLOCK]
            sim = flat[rows] @ flat.T / tau
            sim[torch.arange(len(rows), device=f.device), rows] = float("-inf")  # a != anchor
            parts.append(sim.logsumexp(-1))
        lse = torch.cat(parts).reshape(b, m)
    per_position = -mean_pos / tau + lse  # eq. 1 per anchor
    return _reduce(per_position.mean(1), n_pos > 0, reduction)  # eq. 4


def global_ccl_loss(g: torch.Tensor, labels: torch.Tensor, tau: float = TAU, reduction: str = "sum"
                    ) -> torch.Tensor:
    """Eq. 5 on pooled features ``g`` ``[B, D]``: supervised contrast, positives = same label; a scalar."""
    b = g.shape[0]
    gn = F.normalize(g, dim=-1)
    eye = torch.eye(b, dtype=torch.bool, device=g.device)
    sim = (gn @ gn.T / tau).masked_fill(eye, float("-inf"))
    same = (labels[:, None] == labels[None]) & ~eye
    n_pos = same.sum(1)
    mean_pos = torch.where(same, sim, torch.zeros_like(sim)).sum(1) / n_pos.clamp_min(1)
    return _reduce(-mean_pos + sim.logsumexp(1), n_pos > 0, reduction)


def ccl_loss(f: torch.Tensor, g: torch.Tensor, labels: torch.Tensor, k: int, tau: float = TAU,
             lambda1: float = LAMBDA1, lambda2: float = LAMBDA2, negatives: str = "all", reduction: str = "sum",
             anchors: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 6's CCL part: ``lambda1 * local_ccl_loss(f) + lambda2 * global_ccl_loss(g)``."""
    local = local_ccl_loss(f, labels, k, tau, negatives, reduction, anchors)
    return lambda1 * local + lambda2 * global_ccl_loss(g, labels, tau, reduction)


def feature_view(maps: torch.Tensor, generator: torch.Generator | None = None, max_shift: int = 1,
                 jitter: float = 4.0, flip: bool = False) -> torch.Tensor:
    """A random view ``[B, H, W, C]`` of cached maps ``[B, H, W, C]`` (the paper's augmented image, in feature space).

    Per image: a shift by (dy, dx), each uniform in [-max_shift, max_shift]
    (``out[y, x] = in[clip(y + dy), clip(x + dx)]``), a horizontal flip with
    probability 1/2 if ``flip``, then per-position Gaussian jitter of std
    ``jitter * ||f_p|| / C`` per channel (UniAD's feature_jitter form;
    RLR's code runs with ``--feature_jitter 4``).
    """
    b, h, w, c = maps.shape
    dev = maps.device
    out = maps
    if max_shift > 0:
        r = max_shift
        shifts = torch.randint(-r, r + 1, (b, 2), generator=generator, device="cpu").to(dev)
        ys = (torch.arange(h, device=dev)[None] + shifts[:, :1]).clamp(0, h - 1)  # [B, H]
        xs = (torch.arange(w, device=dev)[None] + shifts[:, 1:]).clamp(0, w - 1)  # [B, W]
        bi = torch.arange(b, device=dev)[:, None, None]
        out = out[bi, ys[:, :, None], xs[:, None, :]]
    if flip:
        flips = torch.rand(b, generator=generator, device="cpu").to(dev) < 0.5
        out = torch.where(flips[:, None, None, None], out.flip(2), out)
    if jitter > 0:
        noise = torch.randn(out.shape, generator=generator, device="cpu").to(dev)
        out = out + noise * out.norm(dim=-1, keepdim=True) / c * jitter
    return out

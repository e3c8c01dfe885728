"""RLR: reconstruct feature maps from a learnable reference (seed 003, He et al., ECCV 2024).

Plain ``nn.Module``s on cached maps ``x`` ``[B, H*W, C_in]`` (no backbone):

- ``Projector``: C_in -> D (a 1x1 conv, then residual 3x3 conv blocks); its output
  is CCL's "projected feature map" (seed 002's projector phi_p follows the encoder).
- A learnable reference ``R`` ``[H*W, D]``, one query per grid position. The
  reconstruction starts from R, never from x: x enters only as keys/values of
  attention, so the model has no residual path that copies x to the output.
- Per layer (pre-norm): ``R += MLKA(R, F)``, ``R += LCA(R, F)``, ``R += FFN(R)``,
  with ``F`` the projected input.
  * **MLKA** (Masked Learnable Key Attention): queries from R, keys are a
    learnable parameter ``[H*W, D]`` (not computed from x), values from F.
    In training each (query, key) entry is masked with probability
    ``mask_prob`` (``random_key_mask``), so no query can count on reading its
    own position (the identity mapping) or any other single key.
  * **LCA** (Local Cross Attention): queries from R, keys and values from
    ``F + pos`` / ``F``; query p may attend only to keys inside the
    ``window`` x ``window`` square centred on p (``local_window_mask``).
- A final LayerNorm and a Linear D -> C_in give the reconstruction. Because of
  that LayerNorm, ``||recon_p||`` is bounded by the output layer's weights
  whatever x is (``output_bound``): an anomaly far from the training features
  cannot be reproduced, its error grows with its distance.

Our reading of the paper (the repository's text gives no equations):
MLKA's values come from the input features (keys are learnable, so its
attention pattern does not depend on x; masking stops it from learning a
fixed copy of position p); LCA is content-based but local. Sizes are ours,
chosen for 2 CPU cores (see ``docs/HEADS-RLR-CCL.md``): the paper's defaults
(4 layers, EfficientNet-b6 features, 200 epochs on GPU) are noted there.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


# -- masks and attention (pure functions) ------------------------------------------------
def local_window_mask(grid: tuple[int, int], window: int, device: torch.device | None = None) -> torch.Tensor:
    """``[H*W, H*W]`` bool, True where query p may attend key q: ``|dy|, |dx| <= window // 2``.

    Positions are row-major (``p = y * W + x``). ``window`` must be odd (the
    square is centred on p); at the border the square is clipped to the grid.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window={window}: must be an odd number >= 1")
    h, w = grid
    y = torch.arange(h, device=device).repeat_interleave(w)
    x = torch.arange(w, device=device).repeat(h)
    r = window // 2
    return ((y[:, None] - y[None]).abs() <= r) & ((x[:, None] - x[None]).abs() <= r)


def random_key_mask(batch: int, n_queries: int, n_keys: int, p: float,
                    generator: torch.Generator | None = None, device: torch.device | None = None) -> torch.Tensor:
    """``[batch, n_queries, n_keys]`` bool, True = may attend; each entry masked with probability ``p``.

    A query whose keys all came out masked keeps all of them (a softmax over
    nothing is undefined); at ``p <= 0.9`` and 784 keys that never happens in practice.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"mask_prob={p}: must be in [0, 1)")
    keep = torch.rand((batch, n_queries, n_keys), generator=generator, device=device) >= p
    return keep | ~keep.any(-1, keepdim=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None = None,
              need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention with a boolean mask; returns (output, weights or None).

    ``q`` ``[B or 1, h, Nq, d]``, ``k`` and ``v`` ``[B or 1, h, Nk, d]``, ``allowed``
    broadcastable to ``[B, h, Nq, Nk]`` (True = may attend). Masked keys get
    weight exactly 0 (their score is -inf before the softmax). Without
    ``need_weights`` torch's fused kernel runs (3-4x faster on CPU, same maths).
    """
    if torch.jit.is_tracing():  # ONNX export (clad export): plain broadcasting MatMuls (an expand would bake
        need_weights = True  # the example's batch size into the graph; the fused kernel's export differs)
    else:
        b = max(q.shape[0], k.shape[0], v.shape[0])
        q, k, v = (t.expand(b, -1, -1, -1) for t in (q, k, v))
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed), None
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = scores.softmax(-1)
    return weights @ v, weights


def sine_position(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """``[H*W, dim]`` fixed 2-D sine/cosine position code (half the channels for y, half for x)."""
    h, w = grid
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))
    y = torch.arange(h, dtype=torch.float32).repeat_interleave(w)[:, None] * freq
    x = torch.arange(w, dtype=torch.float32).repeat(h)[:, None] * freq
    pe = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], 1)
    return F.pad(pe, (0, dim - pe.shape[1]))


def reconstruction_error(x: torch.Tensor, recon: torch.Tensor, kind: str = "l2+cos") -> torch.Tensor:
    """``[B, H*W]`` per-patch error (anomaly score and, averaged, the training loss).

    ``l2``: squared distance divided by C (mean over channels); ``cos``:
    ``1 - cos(x, recon)``; ``l2+cos`` (default): their sum. The squared term
    sees magnitude (a patch much stronger than normal), the cosine term
    direction regardless of scale (a patch of another texture at a similar norm).
    """
    if kind not in ("l2", "cos", "l2+cos"):
        raise ValueError(f"reconstruction error {kind!r}: choose l2, cos or l2+cos")
    out = x.new_zeros(x.shape[:-1])
    if "l2" in kind:
        out = out + ((x - recon) ** 2).mean(-1)
    if "cos" in kind:
        out = out + 1 - F.cosine_similarity(x, recon, dim=-1, eps=1e-8)
    return out


# -- modules ---------------------------------------------------------------------------
class Projector(nn.Module):
    """``[B, H*W, C_in] -> [B, H*W, D]``: a 1x1 conv, then ``blocks`` residual 3x3 conv blocks.

    Seed 002 finds conv blocks far better than an MLP as CCL's projector
    (Table 5: 4 conv blocks +5.1 I-AUROC, a 2-layer MLP -15.3); 3x3 convs also
    give every projected patch its neighbourhood. GroupNorm(1) (not BatchNorm):
    batches are a few images.
    """

    def __init__(self, in_dim: int, dim: int, grid: tuple[int, int], blocks: int = 2):
        super().__init__()
        self.grid = grid
        self.inp = nn.Conv2d(in_dim, dim, 1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(1, dim), nn.GELU())
                                    for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, n, c = x.shape
        h, w = self.grid
        z = self.inp(x.transpose(1, 2).reshape(b, c, h, w))
        for blk in self.blocks:
            z = z + blk(z)
        return z.flatten(2).transpose(1, 2)


class _Heads(nn.Module):
    """Splits ``[B, N, D]`` into ``[B, h, N, D/h]`` and back."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads = heads

    def split(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(-2, -3)

    def merge(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(-2, -3).flatten(-2)


class MaskedLearnableKeyAttention(_Heads):
    """MLKA: reference queries, learnable keys ``[H*W, D]``, values from the input, random key masking in training."""

    def __init__(self, dim: int, heads: int, n_keys: int, mask_prob: float):
        super().__init__(dim, heads)
        self.mask_prob = mask_prob
        self.keys = nn.Parameter(torch.randn(n_keys, dim) * 0.02)
        self.q = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, ref: torch.Tensor, feats: torch.Tensor, allowed: torch.Tensor | None = None,
                return_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``ref`` ``[B or 1, N, D]``, ``feats`` ``[B, N, D]``; ``allowed`` ``[B, N, N]`` overrides the random mask."""
        b, n, _ = feats.shape
        if allowed is None and self.training and self.mask_prob > 0:
            allowed = random_key_mask(b, n, self.keys.shape[0], self.mask_prob, device=feats.device)
        out, w = attention(self.split(self.q(ref)), self.split(self.keys)[None], self.split(self.v(feats)),
                           None if allowed is None else allowed[:, None], return_weights)
        out = self.out(self.merge(out))
        return (out, w) if return_weights else out


class LocalCrossAttention(_Heads):
    """LCA: reference queries attend to the input only within a ``window`` x ``window`` square."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int], window: int):
        super().__init__(dim, heads)
        self.register_buffer("allowed", local_window_mask(grid, window), persistent=False)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, ref: torch.Tensor, feats: torch.Tensor, pos: torch.Tensor,
                return_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``ref`` ``[B or 1, N, D]``, ``feats`` ``[B, N, D]``, ``pos`` ``[N, D]`` added to the keys."""
        out, w = attention(self.split(self.q(ref)), self.split(self.k(feats + pos)), self.split(self.v(feats)),
                           self.allowed, return_weights)
        out = self.out(self.merge(out))
        return (out, w) if return_weights else out


class RLRBlock(nn.Module):
    """One pre-norm layer: ``R += MLKA(R, F)``, ``R += LCA(R, F)``, ``R += FFN(R)``."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int], window: int, mask_prob: float,
                 ffn_mult: int = 2):
        super().__init__()
        n = grid[0] * grid[1]
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlka = MaskedLearnableKeyAttention(dim, heads, n, mask_prob)
        self.lca = LocalCrossAttention(dim, heads, grid, window)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))

    def forward(self, ref: torch.Tensor, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ref = ref + self.mlka(self.norm1(ref), feats)
        ref = ref + self.lca(self.norm2(ref), feats, pos)
        return ref + self.ffn(self.norm3(ref))


class RLRFeatures(NamedTuple):
    """What CCL needs from one forward pass."""

    projected: torch.Tensor  # [B, H*W, D] projector output (local CL, seed 002 eq. 4)
    pooled: torch.Tensor  # [B, D] mean of the decoded reference (global CL, eq. 5)


class RLRModel(nn.Module):
    """Reconstruct ``x`` ``[B, H*W, C_in]`` from a learnable reference (see the module docstring).

    Args:
        in_dim: C_in of the cached features (360 by default).
        dim: D, the width of the reference and attention (ours: 128-256 on CPU).
        grid: (H, W) of the maps (28 x 28 at crop 224).
        layers: RLR blocks (paper's code: 4; ours 2 on CPU).
        heads: attention heads (ours: 4).
        window: LCA window side, odd (ours: 7, i.e. radius 3 patches = 24 px at stride 8).
        mask_prob: MLKA key-mask probability in training (ours: 0.5; see docs).
        proj_blocks: residual 3x3 conv blocks in the projector (ours: 2; seed 002 uses 4).
        ffn_mult: FFN width multiple (ours: 2).
    """

    def __init__(self, in_dim: int, dim: int, grid: tuple[int, int], layers: int, heads: int, window: int,
                 mask_prob: float, proj_blocks: int = 2, ffn_mult: int = 2):
        super().__init__()
        self.grid = tuple(grid)
        n = grid[0] * grid[1]
        self.projector = Projector(in_dim, dim, self.grid, proj_blocks)
        self.reference = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.register_buffer("pos", sine_position(self.grid, dim), persistent=False)
        self.blocks = nn.ModuleList(RLRBlock(dim, heads, self.grid, window, mask_prob, ffn_mult)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, in_dim)

    def _decode(self, feats: torch.Tensor) -> torch.Tensor:
        ref = (self.reference + self.pos)[None].expand(feats.shape[0], -1, -1)
        for blk in self.blocks:
            ref = blk(ref, feats, self.pos)
        return self.norm(ref)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, RLRFeatures]:
        """(recon ``[B, H*W, C_in]``, ``RLRFeatures``) from one pass."""
        if x.shape[1] != self.reference.shape[0]:
            raise ValueError(f"x has {x.shape[1]} positions, the model's grid {self.grid} has "
                             f"{self.reference.shape[0]}")
        feats = self.projector(x)
        hidden = self._decode(feats)
        return self.head(hidden), RLRFeatures(feats, hidden.mean(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H*W, C_in] -> [B, H*W, C_in]``, the reconstruction."""
        return self.forward_with_features(x)[0]

    def features(self, x: torch.Tensor) -> RLRFeatures:
        """CCL's inputs: the projected map ``[B, H*W, D]`` and the pooled decoded reference ``[B, D]``."""
        return self.forward_with_features(x)[1]

    @torch.no_grad()
    def output_bound(self) -> float:
        """An upper bound on ``||recon_p||`` for any input (final LayerNorm, then Linear).

        The normalized vector has norm sqrt(D) before the affine map, so
        ``||recon_p|| <= ||W||_2 (sqrt(D) max|gamma| + ||beta||) + ||b||``.
        """
        d = self.norm.weight.shape[0]
        ln = math.sqrt(d) * self.norm.weight.abs().max() + self.norm.bias.norm()
        return float(torch.linalg.matrix_norm(self.head.weight, ord=2) * ln + self.head.bias.norm())

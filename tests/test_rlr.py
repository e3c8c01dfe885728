"""RLR: the masks mask what they claim, no identity shortcut, and the reconstruction loss falls on real maps."""

import numpy as np
import pytest
import torch

from stages.heads.rlr_model import (
    LocalCrossAttention,
    MaskedLearnableKeyAttention,
    RLRModel,
    attention,
    local_window_mask,
    random_key_mask,
    reconstruction_error,
    sine_position,
)

torch.set_num_threads(1)


def test_local_window_mask_is_the_square_around_each_position():
    h, w, win = 4, 5, 3
    m = local_window_mask((h, w), win)
    assert m.shape == (20, 20) and m.dtype == torch.bool
    for p in range(h * w):
        for q in range(h * w):
            near = abs(p // w - q // w) <= 1 and abs(p % w - q % w) <= 1
            assert bool(m[p, q]) == near
    assert local_window_mask((h, w), 1).equal(torch.eye(20, dtype=torch.bool))
    assert local_window_mask((h, w), 9).all()
    with pytest.raises(ValueError, match="odd"):
        local_window_mask((h, w), 4)


def test_random_key_mask_rate_and_never_an_empty_row():
    g = torch.Generator().manual_seed(0)
    m = random_key_mask(4, 50, 60, 0.3, generator=g)
    assert m.shape == (4, 50, 60) and abs((~m).float().mean().item() - 0.3) < 0.02
    tiny = random_key_mask(64, 64, 2, 0.9, generator=g)
    assert tiny.any(-1).all()  # an all-masked row is restored, so the softmax is defined


@pytest.mark.parametrize("need_weights", [False, True])
def test_lca_output_ignores_features_outside_the_window(need_weights):
    torch.manual_seed(0)
    grid, win = (6, 7), 3
    lca = LocalCrossAttention(16, 2, grid, win).eval()
    ref = torch.randn(1, 42, 16)
    feats = torch.randn(2, 42, 16)
    pos = sine_position(grid, 16)
    p = 2 * 7 + 3
    outside = ~local_window_mask(grid, win)[p]
    far = feats.clone()
    far[:, outside] += 100 * torch.randn(2, int(outside.sum()), 16)
    near = feats.clone()
    near[:, p - 1] += 1.0

    def out(f):
        res = lca(ref, f, pos, return_weights=need_weights)
        return res[0] if need_weights else res

    with torch.no_grad():
        base, moved_far, moved_near = out(feats), out(far), out(near)
    assert torch.allclose(base[:, p], moved_far[:, p], atol=1e-5)  # nothing outside the window reaches p
    assert not torch.allclose(base[:, p], moved_near[:, p], atol=1e-3)  # inside the window does
    assert not torch.allclose(base[:, 0], moved_far[:, 0], atol=1e-3)  # (position 0 sees some of those rows)


def test_mlka_masked_keys_get_zero_weight_and_weights_ignore_the_input():
    torch.manual_seed(0)
    mlka = MaskedLearnableKeyAttention(16, 2, n_keys=30, mask_prob=0.5)
    ref, f1, f2 = torch.randn(1, 30, 16), torch.randn(3, 30, 16), torch.randn(3, 30, 16)
    allowed = random_key_mask(3, 30, 30, 0.5, generator=torch.Generator().manual_seed(1))
    _, w1 = mlka(ref, f1, allowed=allowed, return_weights=True)
    _, w2 = mlka(ref, f2, allowed=allowed, return_weights=True)
    assert w1.shape == (3, 2, 30, 30)
    assert (w1.permute(1, 0, 2, 3)[:, ~allowed] == 0).all()  # masked keys: weight exactly 0
    assert (w1.permute(1, 0, 2, 3)[:, allowed] > 0).all()
    assert torch.allclose(w1.sum(-1), torch.ones(3, 2, 30))
    assert torch.equal(w1, w2)  # keys are parameters: where MLKA looks does not depend on x
    mlka.train()  # in training a fresh random mask is drawn per call
    _, wa = mlka(ref, f1, return_weights=True)
    frac = (wa == 0).float().mean().item()
    assert 0.4 < frac < 0.6
    mlka.eval()  # and none at evaluation
    _, we = mlka(ref, f1, return_weights=True)
    assert (we > 0).all()


def test_fused_and_explicit_attention_agree():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(2, 2, 12, 8)
    allowed = random_key_mask(2, 12, 12, 0.5, generator=torch.Generator().manual_seed(0))[:, None]
    a, _ = attention(q, k, v, allowed)
    b, w = attention(q, k, v, allowed, need_weights=True)
    assert torch.allclose(a, b, atol=1e-5)
    ref = torch.zeros_like(b)
    for i in range(2):
        for h in range(2):
            s = q[i, h] @ k[0, h].T / np.sqrt(8)
            s[~allowed[i, 0]] = -float("inf")
            ref[i, h] = s.softmax(-1) @ v[i, h]
    assert torch.allclose(b, ref, atol=1e-5)


def _tiny_model(**kw):
    torch.manual_seed(0)
    args = {"in_dim": 24, "dim": 16, "grid": (5, 6), "layers": 2, "heads": 2, "window": 3, "mask_prob": 0.5}
    return RLRModel(**{**args, **kw})


def test_shapes_and_features():
    m = _tiny_model().eval()
    x = torch.randn(3, 30, 24)
    recon, feats = m.forward_with_features(x)
    assert recon.shape == (3, 30, 24)
    assert feats.projected.shape == (3, 30, 16) and feats.pooled.shape == (3, 16)
    assert torch.allclose(m(x), recon) and torch.allclose(m.features(x).pooled, feats.pooled)
    with pytest.raises(ValueError, match="positions"):
        m(torch.randn(1, 29, 24))


def test_no_identity_shortcut_the_output_is_bounded_whatever_the_input():
    """An identity map reproduces any input (error 0); RLR's output norm is capped by its last
    layers, so an input scaled far beyond the training range is not reproduced and its error grows."""
    m = _tiny_model().eval()
    bound = m.output_bound()
    x = torch.randn(2, 30, 24)
    with torch.no_grad():
        for scale in (1.0, 1e2, 1e4):
            big = x.clone()
            big[:, 7] *= scale
            r = m(big)
            assert r.norm(dim=-1).max() <= bound * (1 + 1e-5)
        err = reconstruction_error(big, r, "l2")
        # the scaled patch's error is at least (||x_p|| - bound)^2 / C: it grows with the anomaly
        lower = (big[:, 7].norm(dim=-1) - bound) ** 2 / 24
        assert (err[:, 7] >= lower * (1 - 1e-4)).all() and (err[:, 7] > 1e6).all()
        assert torch.equal(err.argmax(1), torch.tensor([7, 7]))


def test_reconstruction_error_definitions():
    x, r = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    l2 = reconstruction_error(x, r, "l2")
    cos = reconstruction_error(x, r, "cos")
    for b in range(2):
        for p in range(5):
            assert l2[b, p].item() == pytest.approx(float(((x[b, p] - r[b, p]) ** 2).sum() / 8), rel=1e-5)
            c = float(x[b, p] @ r[b, p] / (x[b, p].norm() * r[b, p].norm()))
            assert cos[b, p].item() == pytest.approx(1 - c, abs=1e-5)
    assert torch.allclose(reconstruction_error(x, r), l2 + cos)
    assert reconstruction_error(x, x).abs().max() < 1e-5
    with pytest.raises(ValueError, match="choose"):
        reconstruction_error(x, r, "l1")


def test_reconstruction_loss_falls_on_the_extracted_maps(extracted):
    from cache.image_stream import image_maps
    from cache.store import FeatureStore
    from cache.stream import TrainCache

    cache = TrainCache(FeatureStore(extracted / "cache" / "train.zarr"))
    maps = torch.from_numpy(image_maps(cache, range(len(cache.image_ids)))).flatten(1, 2)  # [10, 784, 360]
    torch.manual_seed(0)
    m = RLRModel(360, 32, (28, 28), layers=1, heads=2, window=5, mask_prob=0.5, proj_blocks=1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        idx = torch.randperm(len(maps), generator=g)[:4]
        loss = reconstruction_error(maps[idx], m(maps[idx])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
    m.eval()
    with torch.no_grad():
        x = maps[:2].clone()
        direction = torch.nn.functional.normalize(torch.randn(360), dim=0)
        x[:, 300] = x[:, 300].norm(dim=-1, keepdim=True) * direction  # a foreign patch at a normal norm
        err = reconstruction_error(x, m(x))
    assert (err[:, 300] > err.median(1).values * 2).all()  # the foreign patch stands out

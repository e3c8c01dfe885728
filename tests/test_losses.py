"""Losses on hand-computed cases and against the written-out equations."""

import math

import pytest
import torch

from stages.train.losses import (
    bce_score_loss,
    contrastive_loss,
    contrastive_reference,
    focal_weight,
    hinge_loss,
    project_shell,
    score_loss,
    variance_loss,
)


def w(loss, gamma=-0.8):
    return (1 - math.exp(-loss)) ** gamma


def test_contrastive_hand_case():
    # 1-D points 0, 1 (label 0) and 1.5 (label 1); M = 1, alpha = 1, gamma = -0.8
    z = torch.tensor([[0.0], [1.0], [1.5]])
    y = torch.tensor([0, 0, 1])
    # positive pair (0,1): L = 1, twice; negative pair (1,2): L = M - 0.5 = 0.5, twice; (0,2) beyond margin
    expected = (2 * w(1.0) * 1.0 + 2 * w(0.5) * 0.5) / 9
    assert contrastive_loss(z, y).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("gamma", [-0.8, 0.8])
@pytest.mark.parametrize("masked", [False, True])
def test_blockwise_value_and_gradient_equal_the_equations(gamma, masked):
    g = torch.Generator().manual_seed(0)
    z = (0.4 * torch.randn(120, 6, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 4, (120,), generator=g)
    with torch.no_grad():
        z[3] = z[9]  # an identical pair: distance 0 must not give NaN
    y[3] = y[9]
    mask = torch.rand(120, generator=g) < 0.7 if masked else None
    ref = contrastive_reference(z, y, 1.0, 1.0, gamma, mask)
    (g_ref,) = torch.autograd.grad(ref, z)
    got = contrastive_loss(z, y, 1.0, 1.0, gamma, mask, block=32)
    (g_got,) = torch.autograd.grad(got, z)
    assert torch.isfinite(got) and got.item() == pytest.approx(ref.item(), rel=1e-10)
    assert torch.allclose(g_got, g_ref, atol=1e-10)


def test_focal_weight_is_finite_at_zero():
    wt = focal_weight(torch.tensor([0.0, 1e-9, 1.0]), 1.0, -0.8)
    assert torch.isfinite(wt).all() and wt[2].item() == pytest.approx(w(1.0))


def test_variance_loss_hand_case():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]])
    # class 0: mean (1, 0), squared distances 1 and 1 -> 1; class 1 has one row: skipped
    assert variance_loss(z, torch.tensor([0, 0, 1])).item() == pytest.approx(1.0)


def test_hinge_loss_eqs_21_23():
    s = torch.tensor([1.0, 0.0, -1.0, 0.2])
    is_anomaly = torch.tensor([1, 1, 0, 0])
    # anomalies: max(0, .5-1)=0, max(0, .5-0)=.5; normals: max(0, -1+.5)=0, max(0, .2+.5)=.7
    assert hinge_loss(s, is_anomaly, 0.5).item() == pytest.approx(1.2 / 4)


def test_bce_score_loss_is_glass_bce_on_the_raw_score():
    s = torch.tensor([2.0, 0.0, -1.0, 0.5])
    is_anomaly = torch.tensor([1, 1, 0, 0])
    # anomalies: -log(sigmoid(s)); normals: -log(1 - sigmoid(s))
    expected = (math.log1p(math.exp(-2.0)) + math.log(2.0) + math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 4
    assert bce_score_loss(s, is_anomaly).item() == pytest.approx(expected)
    assert score_loss(s, is_anomaly, "bce", 0.5).item() == pytest.approx(expected)
    assert score_loss(s, is_anomaly, "hinge", 0.5).item() == pytest.approx(hinge_loss(s, is_anomaly, 0.5).item())
    # the hinge goes flat once normals sit below -delta; BCE keeps ranking them
    deep = torch.tensor([-0.6, -3.0], requires_grad=True)
    hinge_loss(deep, torch.tensor([0, 0]), 0.5).backward()
    assert deep.grad.abs().sum() == 0
    deep.grad = None
    bce_score_loss(deep, torch.tensor([0, 0])).backward()
    assert (deep.grad > 0).all() and deep.grad[0] > deep.grad[1]


def test_project_shell_bounds():
    x = torch.zeros(3, 4)
    x_g = torch.tensor([[0.1, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0.7, 0]])
    norms = (project_shell(x_g, x, 0.5, 1.0) - x).norm(dim=1)
    assert torch.allclose(norms, torch.tensor([0.5, 1.0, 0.7]))


def test_project_shell_takes_a_radius_per_row():
    x = torch.zeros(3, 4)
    x_g = torch.tensor([[0.1, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0.7, 0]])
    r1 = torch.tensor([[0.5], [0.2], [1.0]])
    norms = (project_shell(x_g, x, r1, 2 * r1) - x).norm(dim=1)
    assert torch.allclose(norms, torch.tensor([0.5, 0.4, 1.0]))


def test_global_synthesis_keeps_the_shell_and_leaves_batch_norm_alone_in_eval_mode():
    from stages.heads.clad_model import CladModel
    from stages.train.losses import global_synthesis

    torch.manual_seed(0)
    model = CladModel(16, 2, (32, 8), 32)
    model.train()
    model(torch.randn(64, 16) * 3 + 1)  # running statistics away from their initial values
    before = [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    x = torch.randn(40, 16)
    r1 = torch.linspace(0.5, 2.0, 40)[:, None]
    x_g = global_synthesis(model, x, r1, r1 / 4, 0.1 * r1, steps=4, project_every=2, bn="eval")
    d = (x_g - x).norm(dim=1, keepdim=True)
    assert (d >= r1 - 1e-5).all() and (d <= 2 * r1 + 1e-5).all()
    after = [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert model.training  # handed back in train mode
    global_synthesis(model, x, r1, r1 / 4, 0.1 * r1, steps=4, project_every=2, bn="train")
    moved = [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert not all(torch.equal(a, b) for a, b in zip(before, moved, strict=True))  # GLASS' way moves them


def test_precise_batch_norm_is_the_average_of_the_chunks_batch_statistics():
    from stages.heads.clad_model import precise_batch_norm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model.train()
    for _ in range(5):  # an exponential average of other batches first
        model(torch.randn(16, 3) * 5 + 3)
    model.eval()
    chunks = [torch.randn(32, 3), torch.randn(48, 3) + 1, torch.randn(32, 3) * 2]
    precise_batch_norm(model, chunks)
    bn = model[1]
    with torch.no_grad():
        h = [model[0](c) for c in chunks]
    assert torch.allclose(bn.running_mean, torch.stack([x.mean(0) for x in h]).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, torch.stack([x.var(0) for x in h]).mean(0), atol=1e-5)
    assert bn.momentum == 0.1 and not model.training  # momentum and mode restored


def test_partner_differences_point_to_a_row_of_the_same_class():
    from stages.train.losses import partner_differences

    torch.manual_seed(0)
    pool = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0], [11.0, 10.0], [12.0, 10.0], [50.0, 50.0]])
    pool_group = torch.tensor([0, 0, 1, 1, 1, 2])
    x = torch.tensor([[0.5, 0.5], [10.5, 10.5], [50.0, 49.0], [7.0, 7.0]])
    group = torch.tensor([0, 1, 2, 3])  # class 3 has no row in the pool
    for _ in range(20):
        d = partner_differences(x, group, pool, pool_group)
        for i in range(3):
            target = x[i] + d[i]
            hits = [j for j in range(len(pool)) if torch.allclose(pool[j], target)]
            assert hits and all(pool_group[j] == group[i] for j in hits)
        assert torch.equal(d[3], torch.zeros(2))  # no partner: no displacement (the caller keeps noise)


def test_global_synthesis_from_a_start_direction_keeps_its_direction_on_the_shell():
    from stages.heads.clad_model import CladModel
    from stages.train.losses import global_synthesis

    torch.manual_seed(0)
    model = CladModel(16, 2, (32, 8), 32)
    model.train()
    x = torch.randn(30, 16)
    start = torch.randn(30, 16) * 10
    start[0] = 0  # no partner: falls back to noise
    x_g = global_synthesis(model, x, 1.0, 0.25, 0.0, steps=0, project_every=1, start=start)
    d = x_g - x
    n = d.norm(dim=1)
    assert ((n >= 1 - 1e-5) & (n <= 2 + 1e-5)).all()
    cos = torch.nn.functional.cosine_similarity(d[1:], start[1:], dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)  # radial projection keeps the direction
    assert n[0] > 0


def test_jitter_rows_adds_noise_of_the_asked_norm_per_row_radius():
    from stages.train.losses import jitter_rows

    torch.manual_seed(0)
    x = torch.zeros(4000, 360)
    r1 = torch.where(torch.arange(4000)[:, None] < 2000, 10.0, 40.0)
    norms = jitter_rows(x, r1, 0.5).norm(dim=1)
    assert norms[:2000].pow(2).mean().sqrt() == pytest.approx(5.0, rel=0.01)
    assert norms[2000:].pow(2).mean().sqrt() == pytest.approx(20.0, rel=0.01)
    assert torch.equal(jitter_rows(x, 3.0, 0.0), x)

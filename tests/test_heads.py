"""The Head interface: registry, round trip for every registered head, runs trained before it."""

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from cache.store import FeatureStore
from cache.stream import TrainCache
from core.layout import RunFiles
from pipeline.config import config_from_dict, load_config, save_config
from stages.heads import head_class, head_names, run_key
from stages.train.stage import train_context, train_head
from tests.conftest import clad, set_config

# Settings that make each head train in seconds on the tiny data (others: the fast profile).
TINY = {"clad": {"epochs_contrastive": 1, "epochs_finetune": 1, "batch_contrastive": 1200, "batch_finetune": 2000,
                 "gas_steps": 1, "gas_project_every": 1},
        "rlr": {"epochs": 1, "dim": 32, "layers": 1, "attn_heads": 2}}


def test_unknown_head_is_refused_with_the_list(extracted):
    res = clad("train", str(extracted), "--run", "x", "--head", "nope", check=False)
    assert res.returncode != 0 and "unknown head 'nope'" in res.stderr
    assert all(n in res.stderr for n in head_names())
    assert len(res.stderr.strip().splitlines()) == 1
    helptext = clad("train", "--help").stdout
    assert all(n in helptext for n in head_names())


@pytest.mark.parametrize("name", head_names())
def test_every_head_trains_saves_loads_and_scores(name, extracted, tmp_path):
    cfg = config_from_dict({"train": {"profile": "fast", "head": name, name: TINY.get(name, {})}})
    cfg = dataclasses.replace(cfg, data=load_config(extracted / "config.toml").data,
                              features=load_config(extracted / "config.toml").features)
    store = FeatureStore(extracted / "cache" / "train.zarr")
    cache = TrainCache(store)
    files = RunFiles(tmp_path / name)
    ctx = train_context(cfg, cache, files, torch.device("cpu"), store.info().key, lambda m: None,
                        lambda *a: _NullBar())
    head, summary = train_head(cfg, ctx)
    back = json.loads(json.dumps(summary, default=float))  # the summary is JSON-able, keys and numbers intact
    assert set(back) == set(summary) and back["probe"] == {k: float(v) for k, v in summary["probe"].items()}
    ckpt = torch.load(files.final, map_location="cpu", weights_only=True)  # weights_only: no pickled code
    again = head_class(name).from_checkpoint(ckpt, torch.device("cpu"))
    again.attach_cache(lambda: cache)  # a memory-bank head reads its rows from the cache it names
    maps = torch.from_numpy(np.stack(list(_two_maps(cache).values())).astype(np.float32))
    a, b = head.score_maps(maps), again.score_maps(maps)
    assert a.shape == (2, 784) and torch.isfinite(a).all() and torch.equal(a, b)
    assert ckpt["meta"]["head"] == name and ckpt["meta"]["train_key"] == run_key(cfg)
    assert head.settings == again.settings == cfg.train.head_settings()  # meta["settings"], from the dataclass


def _two_maps(cache):
    from stages.train.labels import normal_maps

    sel = np.zeros(len(cache.image_ids), bool)
    sel[[0, len(sel) - 1]] = True
    return normal_maps(cache, sel)


class _NullBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


# -- runs trained before the head registry -----------------------------------------------
_OLD_KNN = ("head", "holdout", "knn_coreset", "knn_k", "threshold_quantile", "seed")


def _old_key(extract_key: str, flat: dict, labels: str) -> str:
    """The pre-registry train key, written out independently of the code under test."""
    if flat["head"] == "knn":
        settings = {"code": 1, "train": {k: flat[k] for k in _OLD_KNN}}
    else:
        settings = {"code": 1, "labels": labels,
                    "train": {k: v for k, v in flat.items() if not (k == "score_loss" and v == "hinge")}}
    blob = json.dumps({"extract": extract_key, **settings}, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# the CLAD settings that existed before the registry (later ones are hashed only away from their old behaviour)
_OLD_CLAD = ("epochs_contrastive", "epochs_finetune", "batch_contrastive", "batch_finetune", "lr", "weight_decay",
             "adaptor_dims", "disc_hidden", "margin", "alpha", "gamma", "delta", "score_loss",
             "contrast_normals_only", "fusion_p", "gas_steps", "gas_eta", "gas_project_every", "gas_noise",
             "gas_scale", "gas_nn_factor", "use_contrastive", "use_gas", "use_las", "window_shards")
# CLAD's later settings at the behaviour runs had before them (2026-12-02 changed these defaults)
_CLAD_BEFORE = {"mix_classes": False, "gas_bn": "train", "gas_radius": "global", "fusion_beta": "stored",
                "bn_refresh": False, "gas_shell": "fixed", "score_mix": "discriminator",
                "score_mix_pool": "mean", "score_mix_space": "final", "score_mix_coreset": 1.0,
                "score_mix_anomalies": 4, "score_mix_versions": 4}


def _make_old(run_dir):
    """Turn a run into what the pre-registry code wrote: a flat [train] table
    (with threshold_quantile), no calibration, the old key, meta with one threshold."""
    from pipeline.config import dump_toml

    cfg = load_config(run_dir / "config.toml")
    flat = {"profile": cfg.train.profile, "head": cfg.train.head,
            **{k: v for k, v in dataclasses.asdict(cfg.train.head_settings("clad")).items() if k in _OLD_CLAD},
            "holdout": cfg.train.holdout,
            "pseudo_k": cfg.train.pseudo_k, **dataclasses.asdict(cfg.train.head_settings("knn")),
            "threshold_quantile": cfg.calibrate.quantile, "seed": cfg.train.seed}
    tree = {"data": dataclasses.asdict(cfg.data), "features": dataclasses.asdict(cfg.features),
            "synthesis": dataclasses.asdict(cfg.synthesis), "train": flat, "evaluate": dataclasses.asdict(cfg.evaluate)}
    (run_dir / "config.toml").write_text(dump_toml(tree))
    key = _old_key(cfg.extract_key(), flat, cfg.data.labels)
    final = run_dir / "checkpoints" / "final.pt"
    ck = torch.load(final, weights_only=True)
    if "bank_images" in ck:  # knn: the old code stored the float32 rows themselves, not their images
        from stages.heads import load_trained_head

        ck["bank"] = torch.from_numpy(load_trained_head(final, torch.device("cpu"))[0].bank.rows)
        ck["meta"].pop("bank", None)
    ck.pop("bank_images", None)
    ck["meta"] |= {"threshold": 1.0, "train_key": key}
    torch.save(ck, final)
    summary = json.loads((run_dir / "train.json").read_text())
    summary.pop("thresholds", None)
    (run_dir / "train.json").write_text(json.dumps(summary | {"train_key": key, "threshold": 1.0}))
    for f in ("calibration.json", "routing.pt"):
        (run_dir / f).unlink()
    shutil.rmtree(run_dir / "eval", ignore_errors=True)


def test_runs_trained_before_the_registry_still_load_score_and_calibrate(trained, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(trained, work)
    clad("train", str(work), "--run", "nn", "--head", "knn")
    for run in ("t", "nn"):
        _make_old(work / "runs" / run)
    st = {s["stage"]: s for s in json.loads(clad("status", str(work), "--json").stdout)}
    # today's CLAD defaults are not the old run's behaviour: stale, the change named
    assert st["train[t]"]["state"] == "stale" and "bn_refresh" in json.dumps(st["train[t]"])
    set_config(work, train={"clad": _CLAD_BEFORE})  # a workspace that keeps the older behaviour
    st = {s["stage"]: s for s in json.loads(clad("status", str(work), "--json").stdout)}
    assert st["train[t]"]["state"] == "done" and st["train[nn]"]["state"] == "done"
    assert st["calibrate[t]"]["state"] == "missing"
    res = clad("score", str(work), "--run", "nn", str(work.parent), check=False)
    assert res.returncode != 0 and "clad calibrate" in res.stderr
    for run in ("t", "nn"):
        clad("calibrate", str(work), "--run", run)
        clad("evaluate", str(work), "--run", run)
        m = json.loads((work / "runs" / run / "eval" / "metrics.json").read_text())
        assert all(np.isfinite(c["threshold"]) for c in m["per_class"].values())
    st = {s["stage"]: s for s in json.loads(clad("status", str(work), "--json").stdout)}
    assert all(st[f"{s}[{r}]"]["state"] == "done" for s in ("train", "calibrate", "evaluate") for r in ("t", "nn"))
    # an old configuration file (flat [train] with threshold_quantile) reads into today's settings
    old = load_config(work / "runs" / "nn" / "config.toml")
    assert old.calibrate.quantile == 0.99 and old.train.head_settings("knn").knn_k == 1
    save_config(old, tmp_path / "rewritten.toml")
    assert run_key(load_config(tmp_path / "rewritten.toml")) == run_key(old)


@pytest.mark.parametrize("select", ["mean", "cells"])
def test_routed_knn_is_exact_search_among_the_nearest_images_of_the_own_class(select, extracted, tmp_path):
    """The routed head's scores are exact nearest-neighbour distances over the
    rows of the ``images`` training images of the image's class nearest to it
    (by mean feature, or by 4 x 4 cells each matched to its most similar cell),
    computed here independently by brute force."""
    cfg = config_from_dict({"train": {"profile": "fast", "head": "routed_knn",
                                      "routed_knn": {"images": 2, "select": select, "project": 0, "refine": 0.0}}})
    cfg = dataclasses.replace(cfg, data=load_config(extracted / "config.toml").data,
                              features=load_config(extracted / "config.toml").features)
    store = FeatureStore(extracted / "cache" / "train.zarr")
    cache = TrainCache(store)
    ctx = train_context(cfg, cache, RunFiles(tmp_path / "r"), torch.device("cpu"), store.info().key,
                        lambda m: None, lambda *a: _NullBar())
    head, _ = train_head(cfg, ctx)
    from stages.train.labels import normal_maps

    held = normal_maps(cache, ctx.held)  # held-out images: never in the bank
    train = normal_maps(cache, ~ctx.held)
    grid = tuple(head.meta["grid"])

    def cells(m: np.ndarray) -> np.ndarray:  # [16, C]: means of a 4 x 4 partition (grid divisible or not)
        x = m.astype(np.float64).reshape(*grid, -1)
        ys = [(grid[0] * k // 4, -(-grid[0] * (k + 1) // 4)) for k in range(4)]
        xs = [(grid[1] * k // 4, -(-grid[1] * (k + 1) // 4)) for k in range(4)]
        return np.stack([x[a:b, c:d].mean((0, 1)) for a, b in ys for c, d in xs])

    def nearness(i: int, j: int) -> float:
        if select == "mean":
            return float(np.linalg.norm(train[j].astype(np.float64).mean(0) - held[i].astype(np.float64).mean(0)))
        q, b = cells(held[i]), cells(train[j])
        return float(np.sqrt(((q[:, None] - b[None]) ** 2).sum(-1)).min(1).mean())

    assert len({cache.image_class[i] for i in held}) == 2
    for i, m in held.items():
        x = m.astype(np.float64)
        same = [j for j in train if cache.image_class[j] == cache.image_class[i]]
        near = sorted(same, key=lambda j: nearness(i, j))[:2]
        bank = np.concatenate([train[j] for j in near]).astype(np.float64)
        expected = np.sqrt(((x[:, None, :] - bank[None]) ** 2).sum(-1)).min(1)
        got = head.score_maps(torch.from_numpy(m[None].astype(np.float32)))[0].numpy()
        assert np.allclose(got, expected, rtol=1e-4, atol=1e-3)
    # refine = 1: every patch searched again over the whole class -> exact knn within the class
    head.settings = dataclasses.replace(head.settings, refine=1.0)
    for i, m in held.items():
        x = m.astype(np.float64)
        bank = np.concatenate([train[j] for j in train if cache.image_class[j] == cache.image_class[i]])
        expected = np.sqrt(((x[:, None, :] - bank.astype(np.float64)[None]) ** 2).sum(-1)).min(1)
        got = head.score_maps(torch.from_numpy(m[None].astype(np.float32)))[0].numpy()
        assert np.allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_cell_descriptors_and_position_free_cell_distance_on_hand_built_maps():
    """Cells are block means (2 x 2 blocks of a 4 x 4 grid here); the distance
    matches each query cell to the candidate's most similar cell anywhere."""
    from stages.search import cell_descriptors, cell_distance

    x = np.arange(16, dtype=np.float32).reshape(16, 1)  # value = y * 4 + x on a 4 x 4 grid, one channel
    assert cell_descriptors(x, (4, 4), cells=2)[:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    q = np.array([[0.0, 0.0], [3.0, 4.0]])
    a = np.array([[0.0, 0.0], [0.0, 0.0]])  # query cell 1 exact, cell 2 at 5
    b = np.array([[3.0, 4.0], [0.0, 1.0]])  # cell 1 -> (0, 1) at 1, cell 2 -> (3, 4) at 0: order is free
    assert np.allclose(cell_distance(q, np.stack([a, b, q[::-1]])), [2.5, 0.5, 0.0])


def test_principal_axes_and_projected_candidates_on_hand_built_rows():
    """The first axis of points spread along x is x; projected distances never
    exceed true ones; the routed search returns true distances to the best
    candidates of each image, so a query whose projected-nearest row is not
    its true nearest gets the true nearest once enough candidates are re-ranked."""
    from stages.search import exact_distances, nearest_per_image, principal_axes

    pts = np.array([[-3.0, 0.1, 0.0], [-1.0, -0.1, 0.0], [1.0, -0.1, 0.0], [3.0, 0.1, 0.0]])  # x, y uncorrelated
    mean, basis = principal_axes(pts, 1)
    assert np.allclose(mean, 0) and np.allclose(basis[:, 0], [1, 0, 0], atol=1e-6)
    rows = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 5.0],   # image 0: row 1 is nearer in x only
                         [0.4, 0.0, 0.0], [9.0, 0.0, 0.0]])  # image 1
    offsets = np.array([0, 2, 4])
    q = torch.tensor([[0.5, 0.0, 0.0]])
    z = rows[:, :1]  # projection onto x (mean 0)
    d2, idx = nearest_per_image(q[:, :1], z, (z * z).sum(1), offsets, np.array([0, 1]))
    assert idx.tolist() == [[1, 2]]  # in projection: row 1 (x = 0.5) in image 0, row 2 (x = 0.4) in image 1
    assert torch.allclose(d2 + (q[:, :1] ** 2).sum(1, keepdim=True), torch.tensor([[0.0, 0.01]]), atol=1e-6)
    true = exact_distances(q, rows, idx)
    assert torch.allclose(true, torch.tensor([[5.0, 0.1]]), atol=1e-6)  # rerank 2 finds the true nearest, 0.1
    assert torch.allclose(true.amin(1), torch.cdist(q, rows).amin(1))
    assert (np.linalg.norm((pts[:, None] - pts[None]) @ basis, axis=-1)
            <= np.linalg.norm(pts[:, None] - pts[None], axis=-1) + 1e-6).all()


@pytest.mark.parametrize("k", [1, 3])
def test_exact_search_kernel_equals_brute_force_across_blocks_and_query_chunks(k):
    """``nearest_rows`` finds the k nearest rows exactly when both the rows
    (blocks of 7) and the queries (chunks of 5) are split, and reports
    directly computed distances, ascending (far from the origin, where the
    |x|^2 - 2x.r + |r|^2 expansion alone loses digits)."""
    from stages.search import MemoryBank, nearest_rows

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(40, 6, generator=g) + 100.0
    x = torch.randn(12, 6, generator=g) + 100.0
    d, idx = nearest_rows(x, rows, (rows * rows).sum(1), k, block=7, queries=5)
    full = torch.cdist(x.double(), rows.double())
    expected, expected_idx = full.sort(1)
    assert torch.equal(idx, expected_idx[:, :k])
    assert torch.allclose(d.double(), expected[:, :k], rtol=0, atol=1e-5)
    assert torch.allclose(MemoryBank(rows.numpy(), k).score(x).double(), expected[:, :k].mean(1), atol=1e-5)


def test_routed_knn_routes_by_the_one_routing_rule():
    """routed_knn picks the class of the nearest allowed bank image (the rule of
    ``stages.train.routing.class_distances``, which ``Router`` uses too), and
    searches only that class's images; checked against brute force on random banks."""
    from stages.heads.routed_knn import RoutedKnnHead, RoutedKnnSettings
    from stages.train.routing import class_distances

    rng = np.random.default_rng(0)
    for _ in range(30):
        n_cls, n = int(rng.integers(1, 5)), int(rng.integers(6, 30))
        cls = np.sort(np.r_[np.arange(n_cls), rng.integers(0, n_cls, n - n_cls)])
        desc = (rng.normal(size=(n, 8)) + cls[:, None]).astype(np.float32)
        rows = np.repeat(desc, 4, axis=0)  # 4 rows per bank image
        head = RoutedKnnHead(rows, np.arange(0, 4 * n + 1, 4), desc, cls, RoutedKnnSettings(select="mean", project=0),
                             {"class_names": [f"c{k}" for k in range(n_cls)], "grid": [2, 2]})
        for _ in range(10):
            x = (rng.normal(size=(4, 8)) + rng.integers(0, n_cls)).astype(np.float32)
            allowed = rng.random(n) < 0.8
            allowed[rng.integers(n)] = True
            d = np.linalg.norm(desc.astype(np.float64) - x.mean(0).astype(np.float64), axis=1)
            d[~allowed] = np.inf
            nearest = cls[int(np.argmin(d))]
            assert int(np.argmin(class_distances(d, cls, n_cls))) == nearest
            chosen = head.class_images(x, allowed)
            assert set(cls[chosen]) == {nearest} and set(chosen) == set(np.nonzero(allowed & (cls == nearest))[0])

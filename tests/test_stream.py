"""Batch streaming from the cache: exact batch sizes, coverage, reproducibility, held-out images."""

import numpy as np
import torch

from cache.store import FeatureStore
from cache.stream import BatchStream, TrainCache
from stages.train.labels import holdout_images


def _stream(work, n_normal=500, n_anomaly=200, window=2, seed=0):
    cache = TrainCache(FeatureStore(work / "cache" / "train.zarr"))
    held = holdout_images(cache, 0.2, 0)
    return cache, held, BatchStream(cache, n_normal, n_anomaly, seed, held, window=window)


def test_batches_are_exact_and_cover_each_normal_row_once(extracted):
    cache, held, stream = _stream(extracted)
    assert held.sum() == 2  # one image of each class
    batches = list(stream.epoch(0))
    assert len(batches) == stream.batches_per_epoch == stream.total_normal // 500
    assert stream.total_normal == 8 * 784
    for b in batches:
        assert b.normal.shape == (500, 360) and b.anomaly.shape == (200, 360)
        assert b.anomaly_pair.shape == (200, 360) and b.anomaly_beta.shape == (200,)
        assert not held[b.normal_image.numpy()].any()
    rows = torch.cat([b.normal for b in batches])
    assert len(torch.unique(rows, dim=0)) == len(rows)  # no row twice within an epoch


def test_epochs_are_reproducible_and_differ(extracted):
    _, _, s1 = _stream(extracted)
    _, _, s2 = _stream(extracted)
    a, b = list(s1.epoch(3)), list(s2.epoch(3))
    assert all(torch.equal(x.normal, y.normal) and torch.equal(x.anomaly, y.anomaly) for x, y in zip(a, b, strict=True))
    c = list(s1.epoch(4))
    assert not torch.equal(a[0].normal, c[0].normal)


def test_pair_rows_are_the_same_place_normal_features(extracted):
    cache = TrainCache(FeatureStore(extracted / "cache" / "train.zarr"))
    d = cache.load(0, ("features", "anomaly", "pair", "yx", "image"))
    a = np.nonzero(d["anomaly"])[0]
    normal_lookup = {(int(d["image"][i]), *map(int, d["yx"][i])): i for i in np.nonzero(d["anomaly"] == 0)[0]}
    for i in a[:50]:
        j = normal_lookup[(int(d["image"][i]), *map(int, d["yx"][i]))]
        assert d["pair"][i] == j


def test_batch_larger_than_cache_is_clipped(extracted):
    _, _, stream = _stream(extracted, n_normal=10**6, n_anomaly=10**5)
    assert stream.n_normal == stream.total_normal and stream.batches_per_epoch == 1
    (b,) = list(stream.epoch(0))
    assert len(b.normal) == stream.total_normal and len(b.anomaly) == stream.n_anomaly > 0
    assert stream.n_anomaly == 10**5 * stream.total_normal // 10**6  # the 10 : 1 ratio is kept


def test_scaled_share_keeps_the_ratio_and_at_least_one_row():
    from cache.stream import scaled_share

    assert scaled_share(250, 1000, 1000) == 250  # not clipped
    assert scaled_share(250, 400, 1000) == 100
    assert scaled_share(3, 10, 1000) == 1  # never rounded down to none
    assert scaled_share(0, 10, 1000) == 0  # LAS off stays off


def test_greedy_k_center_equals_the_textbook_loop():
    from stages.search import greedy_k_center

    z = torch.from_numpy(np.random.default_rng(1).normal(size=(300, 5)).astype(np.float32))
    expected, mind = [7], ((z - z[7]) ** 2).sum(1)
    for _ in range(19):
        expected.append(int(torch.argmax(mind)))
        mind = torch.minimum(mind, ((z - z[expected[-1]]) ** 2).sum(1))
    seen = []
    assert greedy_k_center(z, 20, 7, progress=lambda k, n: seen.append(k)) == expected
    assert seen == [2 * i for i in range(1, 11)]  # a report every tenth of the picks


def test_greedy_coreset_picks_far_apart_rows():
    from stages.search import greedy_coreset

    rng = np.random.default_rng(0)
    clusters = np.concatenate([rng.normal(c, 0.01, (200, 8)) for c in (0.0, 5.0, 10.0)]).astype(np.float32)
    idx = greedy_coreset(clusters, 3, seed=0, proj_dim=8)
    assert sorted(set(i // 200 for i in idx)) == [0, 1, 2]  # one row from each cluster


def test_block_quotas_share_the_picks_in_proportion_and_sum_exactly():
    from stages.search import block_quotas

    assert block_quotas(10, [100, 100]) == [5, 5]
    assert block_quotas(10, [50, 50, 50]) == [4, 3, 3]  # 3.33 each: the one left over to the first
    assert block_quotas(7, [10, 30]) == [2, 5]  # 1.75 and 5.25: the larger remainder gets the pick
    assert block_quotas(1, [5, 5, 5]) == [1, 0, 0]
    assert sum(block_quotas(15_602, [52_006, 52_005, 52_005])) == 15_602


def test_greedy_coreset_picks_as_before_up_to_the_block_size_and_per_block_above_it():
    from stages.search import greedy_coreset, greedy_k_center

    rng = np.random.default_rng(0)
    # four clusters, two in each half of the rows: a selection per half must still find both of its clusters
    x = np.concatenate([rng.normal(c, 0.01, (50, 8)) for c in (0.0, 5.0, 10.0, 15.0)]).astype(np.float32)

    def before_blocks(x, n, seed, proj_dim):  # greedy_coreset as it was before blocks (commit d346e10)
        rng = np.random.default_rng(seed)
        proj = torch.from_numpy((rng.normal(size=(x.shape[1], proj_dim)) / np.sqrt(proj_dim)).astype(np.float32))
        z = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) @ proj
        return np.array(sorted(greedy_k_center(z, n, int(rng.integers(len(x))))))

    for n, seed in ((4, 0), (1, 3), (37, 5), (199, 7)):  # at or below the block size: the same picks as before
        assert np.array_equal(greedy_coreset(x, n, seed=seed, proj_dim=8), before_blocks(x, n, seed, 8))
        assert np.array_equal(greedy_coreset(x, n, seed=seed, proj_dim=8, block_rows=200), before_blocks(x, n, seed, 8))
    ticks = []
    blocked = greedy_coreset(x, 4, seed=0, proj_dim=8, block_rows=100, progress=lambda k, n: ticks.append((k, n)))
    assert sorted(set(i // 50 for i in blocked)) == [0, 1, 2, 3]  # one row from each cluster
    assert (blocked < 100).sum() == 2 and len(set(blocked.tolist())) == 4 and list(blocked) == sorted(blocked)
    assert ticks[-1] == (4, 4) and all(n == 4 for _, n in ticks)  # progress counts over every block
    ticks.clear()  # blocks of one pick report too (greedy_k_center itself reports from the second pick on)
    greedy_coreset(x, 3, seed=0, proj_dim=8, block_rows=70, progress=lambda k, n: ticks.append((k, n)))
    assert ticks == [(1, 3), (2, 3), (3, 3)]
    odd = greedy_coreset(x, 9, seed=1, proj_dim=8, block_rows=70)  # 3 blocks of 67, 66, 67 rows: 3 picks each
    bounds = np.linspace(0, 200, 4).round().astype(int)
    assert [int(((odd >= lo) & (odd < hi)).sum()) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)] == [3] * 3


def test_interleaved_order_spreads_every_class_over_the_epoch():
    from cache.stream import interleaved_order

    # two classes of 5 shards each: the j-th shard of each class has its key in [j/5, (j+1)/5),
    # so every consecutive pair of the order (positions 2j, 2j+1) holds one shard of each class
    shard_class = np.array([0] * 5 + [1] * 5)
    plain_fails = 0
    for seed in range(20):
        order = interleaved_order(shard_class, np.random.default_rng(seed))
        assert sorted(order.tolist()) == list(range(10))
        pairs = shard_class[order].reshape(5, 2)
        assert (pairs.sum(1) == 1).all()
        plain = shard_class[np.random.default_rng(seed).permutation(10)].reshape(5, 2)
        plain_fails += int(not (plain.sum(1) == 1).all())
    assert plain_fails > 0  # a plain permutation does not have that property
    # unequal classes (6, 3, 1 shards): each class is still once per 1/n of the epoch
    shard_class = np.array([0] * 6 + [1] * 3 + [2])
    order = interleaved_order(shard_class, np.random.default_rng(3))
    cls = shard_class[order]
    assert all(len(set(cls[w:w + 4].tolist())) >= 2 for w in range(7))


def test_mixed_stream_batches_hold_several_classes(extracted):
    cache = TrainCache(FeatureStore(extracted / "cache" / "train.zarr"))
    held = holdout_images(cache, 0.2, 0)
    mixed = BatchStream(cache, 300, 100, 0, held, window=2, mix_classes=True)
    classes = [set(cache.image_class[b.normal_image.numpy()].tolist()) for b in mixed.epoch(0)]
    assert len(classes) > 3 and all(len(c) == 2 for c in classes)  # every window: one shard of each class


def test_class_nn_distances_equal_brute_force_per_class(extracted):
    from stages.heads.clad_shell import class_nn_distances
    from stages.train.labels import normal_maps

    cache = TrainCache(FeatureStore(extracted / "cache" / "train.zarr"))
    held = holdout_images(cache, 0.2, 0)
    got = class_nn_distances(cache, held, seed=0)
    assert got.shape == (2,)
    for c in range(2):
        q = np.concatenate(list(normal_maps(cache, held & (cache.image_class == c)).values())).astype(np.float64)
        bank = np.concatenate(list(normal_maps(cache, ~held & (cache.image_class == c)).values())).astype(np.float64)
        d2 = (q * q).sum(1)[:, None] + (bank * bank).sum(1)[None] - 2 * q @ bank.T
        want = np.median(np.sqrt(np.maximum(d2.min(1), 0)))
        assert abs(got[c] - want) < 1e-3 * want
    assert abs(got[0] - got[1]) > 0.05 * got.max()  # the two classes (a texture, an object) differ


def test_class_image_max_distances_equal_brute_force_per_class(extracted):
    """gas_nn_stat = image_max: the median over held-out images of each one's largest patch NN distance."""
    from stages.heads.clad_shell import class_nn_distances
    from stages.train.labels import normal_maps

    cache = TrainCache(FeatureStore(extracted / "cache" / "train.zarr"))
    held = holdout_images(cache, 0.2, 0)
    got = class_nn_distances(cache, held, seed=0, stat="image_max")
    median = class_nn_distances(cache, held, seed=0)
    for c in range(2):
        bank = np.concatenate(list(normal_maps(cache, ~held & (cache.image_class == c)).values())).astype(np.float64)
        worst = []
        for q in normal_maps(cache, held & (cache.image_class == c)).values():
            q = q.astype(np.float64)
            d2 = (q * q).sum(1)[:, None] + (bank * bank).sum(1)[None] - 2 * q @ bank.T
            worst.append(np.sqrt(np.maximum(d2.min(1), 0)).max())
        assert abs(got[c] - np.median(worst)) < 1e-3 * got[c]
        assert got[c] > median[c]  # an image's worst patch lies beyond the median patch


def test_row_sample_is_uniform_over_training_rows_and_keeps_pairs(extracted):
    cache = TrainCache(FeatureStore(extracted / "cache" / "train.zarr"))
    held = holdout_images(cache, 0.2, 0)
    d = cache.row_sample(held, 2000, 500, seed=0)
    assert 1700 < len(d["normal"]) < 2300 and 350 < len(d["anomaly"]) < 650
    assert not held[d["image"]].any()
    per_class = np.bincount(cache.image_class[d["image"]], minlength=2)
    assert abs(per_class[0] - per_class[1]) < 0.2 * len(d["normal"])  # 4 training images per class: even
    assert len(d["pair"]) == len(d["anomaly"]) == len(d["beta"]) and ((d["beta"] > 0) & (d["beta"] < 1)).all()
    again = cache.row_sample(held, 2000, 500, seed=0)
    assert np.array_equal(again["normal"], d["normal"])  # reproducible


class _HandCache(TrainCache):
    """A TrainCache over hand-built shards (no store): ``shards`` is a list of
    ``(features [n, C], image [n])`` of normal rows."""

    def __init__(self, shards, image_class, class_names):
        self.shards = shards
        self.class_names = class_names
        self.image_class = np.asarray(image_class)
        self.image_ids = [f"{class_names[c]}/{i}" for i, c in enumerate(self.image_class)]
        self.n_shards = len(shards)
        counts = [len(np.unique(img)) for _, img in shards]
        self.image_offsets = np.cumsum([0] + counts)
        self.embed_dim = shards[0][0].shape[1]

    def load(self, shard, names=("features", "anomaly", "image")):
        f, img = self.shards[shard]
        return {"features": f, "anomaly": np.zeros(len(f), np.int64), "image": img}


def test_class_radii_use_the_class_own_rows_even_in_a_shard_another_class_starts():
    """Shards are cut by image count: shard 1 holds class a's images 4-5 and all of class b
    (images 6-7), so b starts no shard (this failed: 'need at least one array'), and b's
    training rows lie on a's held-out rows (a bank mixing them in gives a 0). Each class's
    radius is the median distance of its held-out rows to its own training rows, by hand:
    a 0.5, b 3.0 (a's rows would give 0.5), c 2.0."""
    from stages.heads.clad_shell import class_nn_distances

    def image(x0):  # 4 rows on a line: x0, x0 + 10, x0 + 20, x0 + 30
        return np.stack([[x0 + 10.0 * k, 0.0] for k in range(4)]).astype(np.float16)

    maps = {0: image(0.5), **{i: image(float(i)) for i in range(1, 6)}}  # a: held 0.5 + 10k; training i + 10k
    maps[6], maps[7] = image(3.5), image(0.5)  # b: held 3.5 + 10k; training on a's held rows
    maps[8] = image(100.0)  # c: held
    maps.update({i: image(102.0) for i in range(9, 12)})  # c: training, 2 away
    classes = [0] * 6 + [1] * 2 + [2] * 4

    def shard(lo, hi):
        return (np.concatenate([maps[i] for i in range(lo, hi)]),
                np.concatenate([np.full(4, i) for i in range(lo, hi)]))

    cache = _HandCache([shard(0, 4), shard(4, 8), shard(8, 12)], classes, ["a", "b", "c"])
    held = np.zeros(12, bool)
    held[[0, 6, 8]] = True
    assert np.allclose(class_nn_distances(cache, held, seed=0), [0.5, 3.0, 2.0], atol=1e-3)
    assert np.allclose(class_nn_distances(cache, held, seed=0, stat="image_max"), [0.5, 3.0, 2.0], atol=1e-3)

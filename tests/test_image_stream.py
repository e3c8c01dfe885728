"""Whole-map streaming: sizes, each image once per epoch, reproducibility, balance, maps equal the rows."""

import numpy as np
import pytest
import torch

from cache.image_stream import ImageStream, balanced_order, image_maps
from cache.store import FeatureStore
from cache.stream import TrainCache
from core.errors import CladError

torch.set_num_threads(1)


def _cache(work):
    return TrainCache(FeatureStore(work / "cache" / "train.zarr"))


def _held(cache):
    held = np.zeros(len(cache.image_ids), bool)
    held[[0, len(held) - 1]] = True  # one image of each class (the plan is class-sorted)
    return held


@pytest.mark.parametrize("batch, window", [(3, 1), (4, 2), (16, 4)])
def test_every_non_excluded_image_exactly_once(extracted, batch, window):
    cache = _cache(extracted)
    held = _held(cache)
    stream = ImageStream(cache, batch, seed=0, excluded_images=held, window=window)
    assert stream.grid == (28, 28) and stream.n_images == 8
    batches = list(stream.epoch(0))
    assert len(batches) == stream.batches_per_epoch == -(-8 // batch)
    assert all(len(b.image) == batch for b in batches[:-1])  # only the last one may be partial
    assert len(batches[-1].image) == 8 - batch * (len(batches) - 1)
    seen = torch.cat([b.image for b in batches]).numpy()
    assert sorted(seen) == sorted(np.nonzero(~held)[0])
    for b in batches:
        assert b.maps.shape == (len(b.image), 28, 28, 360) and b.maps.dtype == torch.float32
        assert torch.equal(b.label, torch.from_numpy(cache.image_class[b.image.numpy()]))


def test_maps_equal_the_cached_rows_at_their_yx(extracted):
    cache = _cache(extracted)
    d = cache.load(1, ("features", "anomaly", "image", "yx"))
    img = int(d["image"][0])
    maps = image_maps(cache, [img, 0])
    rows = np.nonzero((d["image"] == img) & (d["anomaly"] == 0))[0]
    for r in rows:
        y, x = d["yx"][r]
        assert np.array_equal(maps[0, y, x], d["features"][r].astype(np.float32))
    stream = ImageStream(cache, 4, seed=1, excluded_images=np.zeros(len(cache.image_ids), bool))
    got = {int(i): m for b in stream.epoch(0) for i, m in zip(b.image, b.maps, strict=True)}
    assert np.array_equal(got[img].numpy(), maps[0]) and np.array_equal(got[0].numpy(), maps[1])


def test_rows_in_any_storage_order_give_the_same_map(extracted):
    from cache.image_stream import _assemble

    cache = _cache(extracted)
    d = cache.load(0, ("features", "anomaly", "image", "yx"))
    p = np.random.default_rng(0).permutation(len(d["image"]))
    shuffled = {k: v[p] for k, v in d.items()}
    a, b = _assemble(d, (28, 28)), _assemble(shuffled, (28, 28))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    broken = {k: v[p][1:] for k, v in d.items()}  # one normal row missing
    with pytest.raises(CladError, match="normal rows"):
        _assemble({k: v[broken["anomaly"] == 0] for k, v in broken.items()}, (28, 28))


def test_order_is_a_function_of_seed_and_epoch(extracted):
    cache = _cache(extracted)
    held = _held(cache)

    def order(seed, epoch):
        s = ImageStream(cache, 3, seed=seed, excluded_images=held, window=1)
        return [b.image.tolist() for b in s.epoch(epoch)]

    assert order(0, 2) == order(0, 2)
    assert order(0, 2) != order(0, 3)
    assert order(0, 2) != order(1, 2)


def test_balanced_batches_mix_classes_in_pairs(extracted):
    cache = _cache(extracted)
    held = _held(cache)
    for epoch in range(4):
        stream = ImageStream(cache, 4, seed=0, excluded_images=held, balanced=True, window=4)
        for b in stream.epoch(epoch):
            counts = np.bincount(b.label.numpy(), minlength=2)
            assert counts.tolist() == [2, 2]  # 4 + 4 images: every batch is 2 + 2


def test_balanced_order_interleaves_pairs_proportionally():
    labels = np.repeat([0, 1, 2], [8, 8, 4])
    rng = np.random.default_rng(0)
    for _ in range(20):
        o = balanced_order(labels, rng)
        assert sorted(o) == list(range(20))
        seq = labels[o]
        assert all(seq[2 * j] == seq[2 * j + 1] for j in range(10))  # same-label pairs
        for s in range(0, 20, 8):  # every batch of 8 mixes labels
            assert len(set(seq[s:s + 8])) >= 2
        first_half = np.bincount(seq[:10], minlength=3)
        assert all(abs(first_half - np.array([4, 4, 2])) <= 2)  # proportional, within one pair


def test_all_excluded_is_refused(extracted):
    cache = _cache(extracted)
    with pytest.raises(CladError, match="excluded"):
        ImageStream(cache, 4, seed=0, excluded_images=np.ones(len(cache.image_ids), bool))

"""A memory-bank run refers to its training cache (issue 22): routed_knn's checkpoint keeps
which images it chose, not a float32 copy of their rows; scoring reads the rows of the
classes the images are routed to, one class at a time, and gives the scores a head holding
every row gives; a cache that is gone or rebuilt is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stages.heads.routed_bank as routed_module  # where the bank rows are read
from cache.store import FeatureStore
from cache.stream import TrainCache
from core.errors import CladError
from core.layout import RunFiles
from stages.heads import load_trained_head
from stages.heads.registry import run_cache
from stages.heads.routed_knn import RoutedKnnHead
from stages.train.labels import holdout_images, normal_maps
from tests.conftest import clad


@pytest.fixture(scope="module")
def routed_run(extracted) -> RunFiles:
    clad("train", str(extracted), "--run", "bank-rk", "--head", "routed_knn")
    return RunFiles(extracted / "runs" / "bank-rk")


def test_checkpoint_keeps_choices_not_rows(routed_run, extracted):
    ckpt = torch.load(routed_run.final, map_location="cpu", weights_only=True)
    assert "rows" not in ckpt and ckpt["meta"]["bank"] == "cache"
    cache = TrainCache(FeatureStore(extracted / "cache" / "train.zarr"))
    row_bytes = ckpt["meta"]["bank_rows"] * cache.embed_dim * 4  # what the float32 copy of the rows was
    assert routed_run.final.stat().st_size < 0.1 * row_bytes, (routed_run.final.stat().st_size, row_bytes)
    held = holdout_images(cache, 0.05, 0)  # the run's settings: holdout 0.05, seed 0
    assert sorted(ckpt["image_ids"].tolist()) == np.nonzero(~held)[0].tolist()  # every training image, by index


def test_scoring_reads_only_the_routed_class_and_equals_a_head_holding_every_row(routed_run, extracted,
                                                                                 monkeypatch):
    head, meta = load_trained_head(routed_run.final, torch.device("cpu"))
    cache = TrainCache(FeatureStore(extracted / "cache" / "train.zarr"))
    everything = normal_maps(cache, np.ones(len(cache.image_ids), bool))
    full = RoutedKnnHead(np.concatenate([everything[i] for i in head.image_ids.tolist()]).astype(np.float32),
                         head.offsets, head.desc, head.desc_class, head.settings, meta, head.image_ids,
                         head.cells, head.axes)
    read: list[set[int]] = []
    real = routed_module.normal_maps

    def recording(c, selected):
        read.append(set(np.nonzero(selected)[0].tolist()))
        return real(c, selected)

    monkeypatch.setattr(routed_module, "normal_maps", recording)
    held = np.nonzero(~np.isin(np.arange(len(cache.image_ids)), head.image_ids))[0]
    assert len({int(cache.image_class[i]) for i in held}) == 2
    for i in held:  # held-out images of both classes: each routed to its own class
        x = torch.from_numpy(everything[int(i)][None].astype(np.float32))
        got = head.score_maps(x)
        k = int(cache.image_class[i])
        assert head.class_bank(k).group == k  # the class now held is the image's class ...
        own = head.image_ids[head.desc_class == k]
        assert read[-1] == set(own.tolist())  # ... and only its bank images were read
        assert head.class_bank(k).rows.shape[0] == int(sum(len(everything[j]) for j in own.tolist()))
        assert torch.equal(got, full.score_maps(x))
    assert len(read) == 2  # held-out images come class by class: each class read once
    # a batch of every image, the classes interleaved: routed first, then scored class by class
    # (each class read once more), the same scores as the head holding every row
    order = sorted(range(len(cache.image_ids)), key=lambda i: (np.sum(cache.image_class[:i] == cache.image_class[i]),
                                                                 cache.image_class[i]))
    assert len(set(cache.image_class[order[:2]])) == 2
    batch = torch.from_numpy(np.stack([everything[i] for i in order]).astype(np.float32))
    assert torch.equal(head.score_maps(batch), full.score_maps(batch))
    assert len(read) == 4 and read[2] | read[3] == set(head.image_ids.tolist())


def test_a_missing_or_rebuilt_cache_is_one_line(routed_run, tmp_path):
    key = torch.load(routed_run.final, map_location="cpu", weights_only=True)["meta"]["cache_key"]
    with pytest.raises(CladError, match=r"rebuilt since run 'bank-rk' was trained.*--restart") as err:
        run_cache(routed_run, "0" * 64)()
    assert "\n" not in str(err.value)
    assert run_cache(routed_run, key)().store.path == routed_run.train_cache
    with pytest.raises(CladError, match=r"train\.zarr: missing, and run 'gone' reads its memory bank"):
        run_cache(RunFiles(tmp_path / "runs" / "gone"), key)()


@pytest.mark.parametrize("coreset", [1.0, 0.5])
def test_knn_run_keeps_row_choices_and_reads_the_rows_back_from_the_cache(coreset, extracted):
    """knn's checkpoint holds the image of every bank row and the coreset's kept positions;
    the head loaded from it searches exactly the rows training chose (brute force here)."""
    from stages.heads.knn import bank_rows
    from stages.search import greedy_coreset

    run = f"bank-knn-{int(coreset * 100)}"
    clad("train", str(extracted), "--run", run, "--head", "knn", "--set", f"knn_coreset={coreset}")
    files = RunFiles(extracted / "runs" / run)
    ckpt = torch.load(files.final, map_location="cpu", weights_only=True)
    assert "bank" not in ckpt and ("kept" in ckpt) == (coreset < 1)
    cache = TrainCache(FeatureStore(files.train_cache))
    held = holdout_images(cache, 0.05, 0)  # the run's holdout and seed
    rows, images = bank_rows(cache, ~held)
    if coreset < 1:
        keep = greedy_coreset(rows, int(len(rows) * coreset), 0)
        rows, images = rows[keep], images[keep]
    assert files.final.stat().st_size < 0.05 * rows.nbytes
    head, _ = load_trained_head(files.final, torch.device("cpu"))
    assert np.array_equal(head.bank.rows, rows) and np.array_equal(head.bank_images, images)
    first_held = int(np.nonzero(held)[0][0])
    x = torch.from_numpy(normal_maps(cache, held)[first_held][None].astype(np.float32))
    expected = torch.cdist(x[0].double(), torch.from_numpy(rows).double()).amin(1)
    assert torch.allclose(head.score_maps(x)[0].double(), expected, atol=1e-4)

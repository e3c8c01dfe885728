"""A damaged or incomplete cache is refused or repaired, never used silently."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from cache.store import FeatureStore
from cache.stream import TrainCache
from core.errors import CladError
from stages.evaluate.stage import iter_classes
from tests.conftest import clad


def _flip(path, n=16):
    """Overwrite ``n`` bytes in the middle of a file with their complement."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(255 - b for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def _chunk(store_path, shard, name):
    files = sorted(p for p in (store_path / "shards" / f"{shard:05d}" / name / "c").rglob("*") if p.is_file())
    return files[0]


def test_flipped_chunk_is_refused_with_the_shard_named(extracted, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(extracted, work)
    clad("train", str(work), "--run", "nn", "--head", "knn")
    test_store = work / "cache" / "test.zarr"
    _flip(_chunk(test_store, 0, "features"))
    with pytest.raises(CladError, match=r"test\.zarr/shards/00000: 'features' cannot be read"):
        list(iter_classes(FeatureStore(test_store)))
    res = clad("evaluate", str(work), "--run", "nn", check=False)
    assert res.returncode != 0 and "test.zarr/shards/00000" in res.stderr and "clad extract WORK" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    train_store = work / "cache" / "train.zarr"
    _flip(_chunk(train_store, 1, "features"))
    cache = TrainCache(FeatureStore(train_store))
    with pytest.raises(CladError, match=r"train\.zarr/shards/00001: 'features'"):
        cache.normal_rows(np.zeros(len(cache.image_ids), bool))
    res = clad("train", str(work), "--run", "nn2", "--head", "knn", check=False)
    assert res.returncode != 0 and "train.zarr/shards/00001" in res.stderr


def test_cache_without_checksums_still_reads(tmp_path):
    """Shards written before the crc32c codec (Blosc only, or no codec) read as before."""
    st = FeatureStore(tmp_path / "train.zarr")
    st.create_or_validate("k", {}, [["a/0"]], ["a"])
    g = zarr.open_group(str(st.shard_path(0)), mode="w-")
    x = np.arange(12, dtype=np.float16).reshape(4, 3)
    from cache.store import compressors

    g.create_array("features", shape=x.shape, dtype=x.dtype, chunks=(2, 3),
                   compressors=compressors("lz4", 5))[...] = x
    g.create_array("image", shape=(4,), dtype="int32", chunks=(4,), compressors=None)[...] = 0
    assert np.array_equal(st.read(0, "features"), x) and st.read(0, "image").tolist() == [0] * 4


def test_incomplete_shards_are_reported_and_repaired(extracted, tmp_path):
    import json

    from tests.test_extract_cache import _arrays

    work = tmp_path / "w"
    shutil.copytree(extracted, work)
    cache = work / "cache"
    (cache / "train.zarr" / "shards" / "00001" / "zarr.json").unlink()
    shutil.rmtree(cache / "test.zarr" / "shards" / "00000" / "mask")
    _chunk(cache / "train.zarr", 2, "features").unlink()  # zarr would read fill values here
    st = json.loads(clad("status", str(work), "--json").stdout)[0]
    assert st["state"] == "partial" and (st["done"], st["total"]) == (5, 8)
    assert "3 incomplete shard(s)" in st["detail"] and "clad extract WORK" in st["detail"]
    assert any("test.zarr/shards/00000: array 'mask' missing" in x for x in st["incomplete"])
    res = clad("train", str(work), "--run", "nn", "--head", "knn", check=False)
    assert res.returncode != 0 and "incomplete shard" in res.stderr
    res = clad("extract", str(work))
    assert "3/8 shards to do" in res.stderr and "train.zarr shard 00001 is incomplete" in res.stderr
    ref, got = _arrays(extracted), _arrays(work)
    assert ref.keys() == got.keys()
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k
    assert json.loads(clad("status", str(work), "--json").stdout)[0]["state"] == "done"
    clad("train", str(work), "--run", "nn", "--head", "knn")


def _resave(path, invert=False):
    """Rewrite an image uncompressed (its size then depends only on its shape)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = im.convert("RGB")
        (ImageOps.invert(im) if invert else im).save(path, compress_level=0)


def test_same_size_replacement_makes_the_cache_stale(tiny_data, tmp_path):
    import time

    from core.errors import StaleError
    from pipeline.config import Config, DataConfig
    from stages.extract.plan import make_plan
    from stages.extract.stage import open_stores

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    cfg = Config(data=DataConfig(root=str(data)))
    image = make_plan(cfg).samples["train"][0].path
    _resave(image)
    plan = make_plan(cfg)
    open_stores(cfg, tmp_path / "cache", plan)
    (tmp_path / "cache" / "train.zarr" / "shards" / "00000").mkdir()  # holds a shard (an empty store is replaced)
    size = Path(image).stat().st_size
    time.sleep(0.05)  # a user's replacement comes later than the file system's timestamp granularity
    _resave(image, invert=True)  # another picture, same number of bytes
    assert Path(image).stat().st_size == size
    again = make_plan(cfg)
    assert again.legacy_fingerprint == plan.legacy_fingerprint and again.fingerprint != plan.fingerprint
    with pytest.raises(StaleError, match="--rebuild"):
        open_stores(cfg, tmp_path / "cache", again)


def test_cache_keyed_by_sizes_only_stays_valid(tiny_data, tmp_path):
    """A cache extracted before mtimes were fingerprinted keeps its key."""
    from dataclasses import replace

    from pipeline.config import Config, DataConfig
    from stages.extract.plan import make_plan
    from stages.extract.stage import open_stores

    cfg = Config(data=DataConfig(root=str(tiny_data)))
    plan = make_plan(cfg)
    old = open_stores(cfg, tmp_path / "cache", replace(plan, fingerprint=plan.legacy_fingerprint))
    key = old["train"].info().key
    new = open_stores(cfg, tmp_path / "cache", make_plan(cfg))
    assert new["train"].info().key == key and new["test"].info().settings["dataset"] == plan.legacy_fingerprint


def test_a_data_set_copied_anew_keeps_its_cache_and_a_changed_one_does_not(tiny_data, tmp_path):
    """Same bytes with new mtimes (a fresh copy) is the same data set: recognised by the
    content recorded at extraction; an image changed in the copy still makes the cache stale."""
    import json
    import time

    from tests.conftest import set_config

    data, work = tmp_path / "data", tmp_path / "work"
    shutil.copytree(tiny_data, data)
    clad("init", str(work), "--data", str(data))
    set_config(work, features={"shard_images": 8})
    clad("extract", str(work))
    rec = json.loads((work / "cache" / "dataset.json").read_text())
    assert rec["fingerprint"] == FeatureStore(work / "cache" / "train.zarr").info().settings["dataset"]
    key = FeatureStore(work / "cache" / "train.zarr").info().key
    time.sleep(0.05)
    shutil.rmtree(data)
    shutil.copytree(tiny_data, data, copy_function=shutil.copyfile)  # new mtimes, same bytes
    assert json.loads(clad("status", str(work), "--json").stdout)[0]["state"] == "done"
    out = clad("extract", str(work))
    assert "already done" in out.stdout + out.stderr and "(a copy)" in out.stdout + out.stderr
    assert FeatureStore(work / "cache" / "train.zarr").info().key == key
    assert len(json.loads((work / "cache" / "dataset.json").read_text())["same_content"]) == 1
    image = sorted((data / "weave" / "train" / "good").glob("*.png"))[0]
    _resave(image, invert=True)  # another picture in the copy
    stale = json.loads(clad("status", str(work), "--json").stdout)[0]
    assert stale["state"] == "stale" and "data set changed" in stale["detail"]
    res = clad("extract", str(work), check=False)
    assert res.returncode != 0 and "--rebuild" in res.stderr

"""The cache contract: shapes, pair rows, foreign configs refused, resume after kill -9, Dask."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from cache.store import FeatureStore
from tests.conftest import CLAD, ROOT, clad, set_config


def _arrays(work):
    out = {}
    for split in ("train", "test"):
        st = FeatureStore(work / "cache" / f"{split}.zarr")
        for shard in st.committed():
            g = st.open_shard(shard)
            for name in g.array_keys():
                out[f"{split}/{shard}/{name}"] = g[name][...]
    return out


def test_train_and_test_store_contents(extracted):
    train = FeatureStore(extracted / "cache" / "train.zarr")
    info = train.info()
    assert info.class_names == ["washer", "weave"]
    assert len(info.plan) == 4 and sum(map(len, info.plan)) == 10  # 10 images in shards of 3
    g = train.open_shard(0)
    feats, anom, pair, yx, img = (g[n][...] for n in ("features", "anomaly", "pair", "yx", "image"))
    assert feats.dtype == np.float16 and feats.shape[1] == 360
    normals = anom == 0
    assert normals.sum() == 3 * 784  # every patch of every normal image
    assert (~normals).sum() > 0  # some anomaly rows
    a = np.nonzero(~normals)[0]
    assert (anom[pair[a]] == 0).all() and (pair[normals] == -1).all()
    assert (yx[pair[a]] == yx[a]).all() and (img[pair[a]] == img[a]).all()  # same place, same image
    assert (g["beta"][...][a] >= 0.2).all()
    test = FeatureStore(extracted / "cache" / "test.zarr").open_shard(0)
    assert test["features"].shape[1:] == (784, 360)
    assert test["mask"].shape[1:] == (224, 224) and test["mask"].dtype == np.uint8
    labels, masks = test["label"][...], test["mask"][...]
    assert all(masks[i].any() == bool(labels[i]) for i in range(len(labels)))


def test_rerun_does_nothing_and_status_done(extracted):
    res = clad("extract", str(extracted))
    assert "already done" in res.stderr
    assert "extract" in clad("status", str(extracted)).stdout and "done" in clad("status", str(extracted)).stdout


def test_foreign_config_is_refused_but_training_setting_is_not(extracted, tmp_path):
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(extracted, work)
    set_config(work, train={"lr": 1e-3})
    assert "already done" in clad("extract", str(work)).stderr
    set_config(work, features={"embed_dim": 200})
    res = clad("extract", str(work), check=False)
    assert res.returncode != 0 and "features.embed_dim: 360 -> 200" in res.stderr and "--rebuild" in res.stderr
    st = clad("status", str(work), "--json").stdout
    assert '"stale"' in st


def test_kill9_resume_is_byte_identical(extracted, tiny_data, tmp_path):
    work = tmp_path / "killed"
    clad("init", str(work), "--data", str(tiny_data))
    set_config(work, features={"shard_images": 3})
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(CLAD + ["extract", str(work)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = work / "cache" / "train.zarr" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shards.is_dir() and len(list(shards.iterdir())) >= 1:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # land mid-shard
    assert proc.poll() is None, "extraction finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(list(shards.iterdir()))
    assert 1 <= partial < 4
    import json

    st = json.loads(clad("status", str(work), "--json").stdout)[0]
    assert st["state"] == "partial" and (st["done"], st["total"]) == (partial, 8)
    res = clad("extract", str(work))
    assert f"{8 - partial}/8 shards to do" in res.stderr
    ref, got = _arrays(extracted), _arrays(work)
    assert ref.keys() == got.keys()
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k
    assert not (work / "cache" / "train.zarr" / ".tmp").exists() or not any(
        (work / "cache" / "train.zarr" / ".tmp").iterdir())


@pytest.mark.slow
def test_dask_local_cluster_gives_identical_arrays(extracted, tiny_data, tmp_path):
    work = tmp_path / "dask"
    clad("init", str(work), "--data", str(tiny_data))
    set_config(work, features={"shard_images": 3})
    res = clad("extract", str(work), "--scheduler", "local", process=True)
    assert "Dask scheduler local" in res.stderr
    ref, got = _arrays(extracted), _arrays(work)
    assert ref.keys() == got.keys()
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k


def test_dask_task_uses_the_current_plan_not_a_workers_stale_one(tiny_data, tmp_path):
    """A worker process that extracted for a data set and is then given a
    shard after its files changed (same settings, a class removed) labels rows with the
    new plan's class ids and image offsets: tasks carry their shard's part of
    the plan, and the worker's extractor is keyed by settings + fingerprint."""
    import shutil

    import torch

    from pipeline.config import Config, DataConfig, FeatureConfig, SynthesisConfig
    from stages.extract import stage as extract
    from stages.extract.plan import make_plan

    threads = torch.get_num_threads()
    try:
        plans = {}
        data = tmp_path / "data"
        shutil.copytree(tiny_data, data)
        for name, drop in (("a", None), ("b", "washer")):
            if drop:  # same folder, same settings: only the files on disk changed
                shutil.rmtree(data / drop)
            cfg = Config(data=DataConfig(root=str(data)), features=FeatureConfig(shard_images=2),
                         synthesis=SynthesisConfig(variants=1))
            plan = plans[name] = make_plan(cfg)
            extract.open_stores(cfg, tmp_path / f"cache-{name}", plan)
            task = plan.task("train", 1)
            res = extract.extract_unit(cfg, task, plan.fingerprint, str(tmp_path / f"cache-{name}"), "cpu")
            assert not res["skipped"] and list(extract._WORKER_CACHE) == [(cfg.extract_key(), plan.fingerprint)]
            g = FeatureStore(tmp_path / f"cache-{name}" / "train.zarr").open_shard(1)
            want = [plan.class_names.index(s.class_name) for s in task.samples]
            assert sorted(set(g["class_id"][...].tolist())) == sorted(set(want))
            assert sorted(set(g["image"][...].tolist())) == [2, 3]
        assert plans["a"].class_names == ["washer", "weave"] and plans["b"].class_names == ["weave"]
    finally:
        extract._WORKER_CACHE.clear()
        torch.set_num_threads(threads)

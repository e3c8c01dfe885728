"""Bad input: one clear line naming the file and the fix, non-zero exit, nothing half-written."""

import shutil

import numpy as np
import pytest
from PIL import Image

from core.errors import CladError
from pipeline.config import DataConfig, FeatureConfig
from stages.extract.data import index_dataset, load_image, load_mask
from tests.conftest import clad


def _copy(tiny_data, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(tiny_data, dst)
    return dst


def test_index_mvtec_layout(tiny_data):
    samples = index_dataset(DataConfig(root=str(tiny_data)))
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert len(train) == 10 and len(test) == 2 * (2 + 3)
    assert all(s.mask_path for s in test if s.label == 1)
    assert {s.class_name for s in samples} == {"weave", "washer"}
    one = index_dataset(DataConfig(root=str(tiny_data / "weave")))  # a single class folder works too
    assert {s.class_name for s in one} == {"weave"}


def test_folder_layout(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / c / "x.png")
    samples = index_dataset(DataConfig(root=str(tmp_path), layout="folder"))
    assert [(s.class_name, s.split) for s in samples] == [("a", "train"), ("b", "train")]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(CladError, match="does not exist"):
        index_dataset(DataConfig(root=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CladError, match="empty"):
        index_dataset(DataConfig(root=str(tmp_path / "empty")))


def test_class_without_training_images(tiny_data, tmp_path):
    data = _copy(tiny_data, tmp_path)
    for p in (data / "weave" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(CladError, match="weave.*no training images"):
        index_dataset(DataConfig(root=str(data)))


def test_mask_size_mismatch_names_the_mask(tiny_data, tmp_path):
    data = _copy(tiny_data, tmp_path)
    mask = next((data / "washer" / "ground_truth").rglob("*_mask.png"))
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    with pytest.raises(CladError, match=f"{mask.name}.*12x10"):
        index_dataset(DataConfig(root=str(data)))


def test_truncated_image_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(CladError, match="bad.png.*unreadable or truncated"):
        load_image(str(p), FeatureConfig())


def test_load_image_and_mask_sizes(tiny_data):
    s = next(iter(index_dataset(DataConfig(root=str(tiny_data)))))
    assert load_image(s.path, FeatureConfig()).shape == (224, 224, 3)
    assert load_image(s.path, FeatureConfig(crop=0)).shape == (256, 256, 3)
    assert load_mask("", FeatureConfig()).shape == (224, 224)


def test_cli_reports_one_line_and_leaves_no_cache(tiny_data, tmp_path):
    data = _copy(tiny_data, tmp_path)
    bad = data / "weave" / "train" / "good" / "001.png"
    bad.write_bytes(b"not an image")
    work = tmp_path / "w"
    clad("init", str(work), "--data", str(data))
    res = clad("extract", str(work), check=False)
    assert res.returncode != 0
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("Error")]
    assert len(err) == 1 and "001.png" in err[0] and "replace or remove" in err[0]
    assert "Traceback" not in res.stderr
    assert not list((work / "cache" / "train.zarr" / "shards").glob("*"))  # nothing committed
    res = clad("init", str(tmp_path / "w2"), "--data", str(tmp_path / "nope"), check=False)
    assert res.returncode != 0 and "does not exist" in res.stderr


def test_cli_unknown_backbone(tiny_data, tmp_path):
    work = tmp_path / "w"
    clad("init", str(work), "--data", str(tiny_data), "--backbone", "not_a_model")
    res = clad("extract", str(work), check=False)
    assert res.returncode != 0 and "not_a_model" in res.stderr and "Traceback" not in res.stderr


def test_real_mvtec_bottle_when_present():
    from tests.conftest import SHARED_DATA

    root = SHARED_DATA / "mvtec_ad"
    if not (root / "bottle").is_dir():
        pytest.skip("../shared/data/mvtec_ad is not on this machine")
    # the shared folder grows (transistor joined bottle): count per class, each class named
    expected = {"bottle": (209, 83, 63), "transistor": (213, 100, 40)}
    for name, (n_train, n_test, n_masks) in expected.items():
        if not (root / name).is_dir():
            continue
        samples = index_dataset(DataConfig(root=str(root), classes=(name,)))
        train = [s for s in samples if s.split == "train"]
        test = [s for s in samples if s.split == "test"]
        assert len(train) == n_train and len(test) == n_test
        assert sum(bool(s.mask_path) for s in test) == n_masks == sum(s.label for s in test)
        bad = next(s for s in test if s.label)
        assert load_mask(bad.mask_path, FeatureConfig()).any()


def test_class_folders_without_training_images_are_refused_not_dropped(tmp_path):
    from stages.extract.demo_data import write_demo_dataset

    data = write_demo_dataset(tmp_path / "d", seed=0, n_train=2, n_test_good=1, n_test_defect=1,
                              classes=("weave", "washer"))
    shutil.rmtree(data / "washer" / "train")
    with pytest.raises(CladError, match=r"washer: class folder without train/good"):
        index_dataset(DataConfig(root=str(data)))
    plain = tmp_path / "plain"
    (plain / "a").mkdir(parents=True)
    (plain / "b").mkdir()
    Image.new("RGB", (32, 32)).save(plain / "a" / "x.png")
    with pytest.raises(CladError, match=r"b: class folder without images"):
        index_dataset(DataConfig(root=str(plain), layout="folder"))

"""The built-in data set: deterministic, MVTec layout, exact masks, not trivially separable."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from core.errors import CladError
from stages.extract.demo_data import write_demo_dataset


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    kw = dict(n_train=2, n_test_good=1, n_test_defect=1, classes=("grain", "capsule"))
    a = write_demo_dataset(tmp_path / "a", seed=3, **kw)
    b = write_demo_dataset(tmp_path / "b", seed=3, **kw)
    c = write_demo_dataset(tmp_path / "c", seed=4, **kw)
    assert _digest(a) == _digest(b) != _digest(c)
    masks = sorted((a / "capsule" / "ground_truth").rglob("*_mask.png"))
    assert len(masks) == 3
    for m in masks:
        mask = np.asarray(Image.open(m)) > 0
        img = np.asarray(Image.open(a / "capsule" / "test" / m.parent.name / m.name.replace("_mask", "")))
        good = np.asarray(Image.open(a / "capsule" / "test" / "good" / "000.png"))
        assert mask.any() and mask.mean() < 0.1  # a small, non-empty defect
        assert img.shape == good.shape == (256, 256, 3)


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    with pytest.raises(CladError, match="not empty"):
        write_demo_dataset(tmp_path / "x", n_train=1, n_test_good=1, n_test_defect=1, classes=("weave",))

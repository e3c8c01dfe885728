"""The generated demo classes (``clad demo-data DIR --n-classes N``): deterministic,
MVTec layout, exact masks, and classes a frozen ImageNet backbone tells apart."""

import hashlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from core.files import seeded
from stages.extract.catalogue import FAMILIES, catalogue, render
from stages.extract.demo_data import SIZE, _defect, write_demo_dataset


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_catalogue_names_families_and_defects():
    looks = catalogue(0, 100)
    names = [lk.name for lk in looks]
    assert names == sorted(names) and len(set(names)) == 100
    assert names[:3] == ["c000-stripes", "c001-ring", "c002-checks"]
    assert {lk.family for lk in looks[:len(FAMILIES)]} == {f.name for f in FAMILIES}
    assert all(len(set(lk.defects)) == 3 for lk in looks)
    assert catalogue(0, 15) == looks[:15]  # class i does not depend on N
    assert catalogue(1, 15) != looks[:15]


def test_every_family_paints_nonempty_masks_on_its_object():
    for lk in catalogue(0, len(FAMILIES)):
        for kind in lk.defects:
            rng = seeded(0, lk.name, kind, 0)
            img, fg = render(lk, rng, SIZE)
            bad, mask = _defect(lk.name, kind, img, fg, rng, np.asarray(lk.ground))
            m = mask.astype(bool)
            assert img.shape == bad.shape == (SIZE, SIZE, 3) and m.shape == (SIZE, SIZE)
            assert m.any() and m.mean() < 0.1, (lk.name, kind)
            assert not (m & ~fg).any(), (lk.name, kind)  # on the object only
            assert np.abs(bad - img)[m].max() > 0.05, (lk.name, kind)  # visibly painted


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    kw = dict(n_train=2, n_test_good=1, n_test_defect=1, n_classes=3)
    a = write_demo_dataset(tmp_path / "a", seed=3, **kw)
    b = write_demo_dataset(tmp_path / "b", seed=3, **kw)
    c = write_demo_dataset(tmp_path / "c", seed=4, **kw)
    assert _digest(a) == _digest(b) != _digest(c)


def test_n_classes_in_mvtec_layout(tmp_path):
    n = len(FAMILIES)  # one class of each family
    root = write_demo_dataset(tmp_path / "d", seed=0, n_train=2, n_test_good=1, n_test_defect=2, n_classes=n)
    looks = catalogue(0, n)
    assert sorted(p.name for p in root.iterdir()) == [lk.name for lk in looks]
    for lk in looks:
        base = root / lk.name
        assert len(list((base / "train" / "good").glob("*.png"))) == 2
        assert len(list((base / "test" / "good").glob("*.png"))) == 1
        assert sorted(p.name for p in (base / "test").iterdir()) == sorted(("good",) + lk.defects)
        for kind in lk.defects:
            masks = sorted((base / "ground_truth" / kind).glob("*_mask.png"))
            assert [m.name for m in masks] == ["000_mask.png", "001_mask.png"]
            for m in masks:
                mask = np.asarray(Image.open(m))
                img = np.asarray(Image.open(base / "test" / kind / m.name.replace("_mask", "")))
                assert img.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE)
                assert set(np.unique(mask)) == {0, 255} and (mask > 0).mean() < 0.1


@pytest.mark.slow
def test_classes_are_told_apart_by_the_default_backbone(tmp_path):
    """Nearest class mean of image features (mean patch row of the real default
    extraction) routes every held-out image, normal or defective, to its class."""
    import torch

    from core.settings import FeatureConfig
    from stages.extract.data import load_image
    from stages.extract.features import FeatureEncoder

    n = 8
    root = write_demo_dataset(tmp_path / "d", seed=0, n_train=4, n_test_good=2, n_test_defect=1, n_classes=n)
    cfg = FeatureConfig()
    encoder = FeatureEncoder(cfg, torch.device("cpu"))

    def features(paths) -> np.ndarray:  # -> [M, C_d]
        images = np.stack([load_image(str(p), cfg) for p in sorted(paths)])
        return encoder(images).astype(np.float32).mean(1)

    names = sorted(p.name for p in root.iterdir())
    train = [features((root / c / "train" / "good").glob("*.png")) for c in names]  # n x [4, C]
    held = [features((root / c / "test").rglob("*.png")) for c in names]  # n x [2 + 3, C]
    means = np.stack([f.mean(0) for f in train])  # [n, C]
    routed = [np.linalg.norm(f[:, None] - means[None], axis=-1).argmin(1) for f in held]
    correct = np.concatenate([r == i for i, r in enumerate(routed)])
    assert correct.mean() >= 0.99, [names[j] for r in routed for j in r]
    spread = max(np.linalg.norm(f - f.mean(0), axis=-1).mean() for f in train)
    between = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(n, 1)].min()
    assert between > 1.5 * spread, (between, spread)  # seed 0: 23.0 vs 10.2


def test_n_classes_with_classes_is_a_one_line_error(tmp_path):
    from pipeline.cli import main

    res = CliRunner().invoke(main, ["demo-data", str(tmp_path / "d"), "--n-classes", "3", "--classes", "weave"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "--n-classes" in lines[0] and "--classes" in lines[0], res.output
    assert not (tmp_path / "d").exists()

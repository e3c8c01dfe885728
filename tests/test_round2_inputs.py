"""Round two of 'nothing silent': inputs read the way the user meant them, or refused in one line."""

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from core.errors import CladError
from core.settings import FeatureConfig
from stages.extract.data import load_image
from tests.conftest import clad

CFG = FeatureConfig(resize=64, crop=0)


def _upright_and_sideways(src: Image.Image, folder, ext: str = "jpg"):
    """The same picture upright and stored turned 90 degrees counter-clockwise with
    EXIF orientation 6 ('turn 90 clockwise to view'), as phones write JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    up, side = folder / f"upright.{ext}", folder / f"phone.{ext}"
    kw = {"quality": 95} if ext == "jpg" else {}
    src.save(up, **kw)
    exif = Image.Exif()
    exif[0x0112] = 6
    src.transpose(Image.Transpose.ROTATE_90).save(side, exif=exif.tobytes(), **kw)
    with Image.open(side) as im:
        assert im.size == (src.size[1], src.size[0])  # stored sideways
    return up, side


def test_exif_orientation_is_applied_when_loading(tmp_path):
    yy, xx = np.mgrid[0:64, 0:96]
    pic = np.stack([xx * 2.5, yy * 3.5, (xx + yy) * 1.5], -1).clip(0, 255).astype(np.uint8)  # not symmetric
    up, side = _upright_and_sideways(Image.fromarray(pic), tmp_path)
    a, b = load_image(str(up), CFG), load_image(str(side), CFG)
    assert np.abs(a - b).mean() < 0.01  # JPEG tolerance; read sideways it differs by ~0.2


def test_exif_orientation_is_applied_when_scoring(trained, tiny_data, tmp_path):
    src = Image.open(sorted((tiny_data / "washer" / "test" / "good").glob("*.png"))[0]).convert("RGB")
    src = src.crop((0, 0, src.size[0], src.size[1] * 5 // 8))  # not square: a sideways read shows
    # PNG keeps the EXIF block too, and is lossless: the two scores must be equal, not near
    # (a tiny model's score moves by 15 % under JPEG noise alone)
    up, side = _upright_and_sideways(src, tmp_path / "in", "png")
    out = tmp_path / "out"
    clad("score", str(trained), "--run", "t", str(up), str(side), "--class", "washer", "--out", str(out))
    rows = {r["path"]: r for r in csv.DictReader((out / "results.csv").open())}
    s_up, s_side = float(rows[str(up)]["score"]), float(rows[str(side)]["score"])
    assert abs(s_up - s_side) <= 1e-5 * abs(s_up), (s_up, s_side)


def _verdicts(tmp_path, text, lowest=0.2):
    from core.layout import RunFiles
    from core.settings import CalibrateConfig
    from stages.train.calibrate import verdicts_in_force

    files = RunFiles(tmp_path / "run")
    files.root.mkdir(exist_ok=True)
    files.user_thresholds.write_text("[thresholds]\n" + text + "\n")
    cal = {"classes": {"washer": {"threshold": 0.5, "scale": 0.1, "min": lowest}}}
    return verdicts_in_force(cal, files, CalibrateConfig())


@pytest.mark.parametrize("value", ["true", "nan", "inf", "-inf", '"1.5"', "-0.5"])
def test_user_thresholds_that_are_not_finite_numbers_or_negative_are_refused(tmp_path, value):
    with pytest.raises(CladError, match=r"thresholds.toml: threshold washer = .*(finite number|negative)") as exc:
        _verdicts(tmp_path, f"washer = {value}")
    assert "\n" not in str(exc.value)


def test_user_thresholds_accepted_where_they_mean_something(tmp_path):
    assert _verdicts(tmp_path, "washer = 2").thresholds["washer"] == 2.0
    # a head whose raw scores go below zero (CLAD's discriminator): a negative threshold is meaningful
    assert _verdicts(tmp_path, "washer = -0.5", lowest=-3.0).thresholds["washer"] == -0.5


def test_score_refuses_a_boolean_threshold_in_one_line(trained, tiny_data, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(trained, work)
    (work / "runs" / "t" / "thresholds.toml").write_text("[thresholds]\nwasher = true\n")
    img = sorted((tiny_data / "washer" / "test" / "good").glob("*.png"))[0]
    res = clad("score", str(work), "--run", "t", str(img), "--out", str(tmp_path / "out"), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "threshold washer = True is not a finite number" in res.stderr.strip().splitlines()[-1]


def test_a_folder_name_does_not_silently_overrule_a_confident_prediction(trained, tiny_data, tmp_path):
    misfiled = tmp_path / "incoming" / "washer"  # weave parts filed under a folder named like the other class
    misfiled.mkdir(parents=True)
    for p in sorted((tiny_data / "weave" / "test" / "good").glob("*.png")):
        shutil.copy(p, misfiled / p.name)
    right = tmp_path / "incoming" / "weave"
    shutil.copytree(tiny_data / "weave" / "test" / "good", right)
    out = tmp_path / "out"
    res = clad("score", str(trained), "--run", "t", str(tmp_path / "incoming"), "--out", str(out))
    rows = list(csv.DictReader((out / "results.csv").open()))
    wrong = [r for r in rows if "/washer/" in r["path"]]
    assert wrong and all(r["predicted_class"] == "weave" and float(r["confidence"]) >= 0.5 for r in wrong)
    # judged against the class it is, the disagreement recorded and said, file by file
    assert all(r["class"] == "weave" and r["folder_class"] == "washer" for r in wrong)
    assert all(r["class_from"] == "predicted (folder says washer)" for r in wrong)
    for r in wrong:
        assert f"{r['path']}: the folder name says 'washer' but the run predicts 'weave'" in res.stderr
    same = [r for r in rows if "/weave/" in r["path"]]
    assert all(r["class"] == "weave" and r["class_from"] == "folder" for r in same)
    # --class still wins, silently: the user said so
    res = clad("score", str(trained), "--run", "t", str(misfiled), "--class", "washer", "--out", str(tmp_path / "o2"))
    rows = list(csv.DictReader((tmp_path / "o2" / "results.csv").open()))
    assert all(r["class"] == "washer" and r["class_from"] == "user (--class)" for r in rows)
    assert "folder name says" not in res.stderr


def test_a_broken_image_link_in_a_training_folder_is_refused(tiny_data, tmp_path):
    import os

    from core.settings import DataConfig
    from stages.evaluate.score import expand_inputs
    from stages.extract.data import index_dataset

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    link = data / "washer" / "train" / "good" / "extra.png"
    os.symlink(tmp_path / "gone.png", link)
    with pytest.raises(CladError, match=r"extra.png: broken symbolic link .*gone.png.*restore its target or remove"):
        index_dataset(DataConfig(root=str(data)))
    # scoring lists it too, so that it is reported as unreadable rather than passed over
    files, _ = expand_inputs([str(link.parent)])
    assert link in files
    with pytest.raises(CladError, match="image file not found .*restore the file"):
        load_image(str(link), CFG)


def test_a_set_the_head_does_not_read_is_refused_and_not_remembered(extracted):
    for sets in (["--set", "epochs_contrastive=2"], ["--set", "clad.margin=2"]):
        res = clad("train", str(extracted), "--run", "unused", "--head", "knn", *sets, check=False)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        line = res.stderr.strip().splitlines()[-1]
        assert "this run trains head knn, which does not read it" in line and "knn_coreset, knn_k" in line
    assert not (extracted / "runs" / "unused").exists()


class _Code:
    def __reduce__(self):
        import os

        return (os.getpid, ())  # code: weights_only must refuse to run it


@pytest.mark.parametrize("kind", ["pickle_with_code", "png", "not_a_dict"])
def test_a_weights_file_that_is_not_a_state_dict_is_one_line(tmp_path, kind):
    import pickle

    import torch

    from stages.extract.backbone import _load_weights

    path = tmp_path / f"weights-{kind}.pt"
    if kind == "pickle_with_code":
        torch.save({"w": _Code()}, path, pickle_module=pickle)
    elif kind == "png":
        Image.new("RGB", (20, 20)).save(path, format="PNG")
    else:
        torch.save([torch.zeros(2)], path)
    with pytest.raises(CladError) as exc:
        _load_weights(torch.nn.Linear(2, 2), "any", str(path))
    msg = str(exc.value)
    assert msg.startswith(str(path)) and "state dict" in msg and "features.weights" in msg
    assert "weights_only" not in msg and "\n" not in msg


def test_bad_weights_then_good_ones_is_not_other_settings(tiny_data, tmp_path):
    from tests.conftest import set_config

    work = tmp_path / "w"
    clad("init", str(work), "--data", str(tiny_data))
    png = tmp_path / "weights.png"
    Image.new("RGB", (20, 20)).save(png)
    set_config(work, features={"weights": str(png), "shard_images": 4})
    res = clad("extract", str(work), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "weights_only" not in res.stderr
    assert f"{png}: not a state dict" in res.stderr.strip().splitlines()[-1]
    # nothing was extracted: the empty cache is missing, not 'extracted with other settings'
    set_config(work, features={"weights": "package"})
    st = clad("status", str(work)).stdout.splitlines()[0]
    assert "missing" in st and "other settings" not in st and "stale" not in st
    clad("extract", str(work))
    assert "done" in clad("status", str(work)).stdout.splitlines()[0]

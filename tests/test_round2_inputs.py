"""Round two of 'nothing silent': inputs read the way the user meant them, or refused in one line."""

import csv
import shutil

import numpy as np
from PIL import Image

from core.settings import FeatureConfig
from stages.data import load_image
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

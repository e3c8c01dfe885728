"""Bad or unusual input images: bit depths, decompression bombs, tiny images, offline hub, exit codes."""

import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from core.errors import CladError
from core.settings import FeatureConfig
from stages.extract.data import load_image, load_rgb
from tests.conftest import ROOT, clad

CFG = FeatureConfig(resize=64, crop=0)


def _gray8(tmp_path):
    rng = np.random.default_rng(0)
    g = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    Image.fromarray(g, "L").save(tmp_path / "g8.png")
    return g


def test_16_bit_png_scales_by_its_depth_not_clipped_white(tmp_path):
    g = _gray8(tmp_path)
    Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # the same picture at 16 bits
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    a, b = load_image(str(tmp_path / "g8.png"), CFG), load_image(str(tmp_path / "g16.png"), CFG)
    assert np.array_equal(a, b)


def test_float_tiff_in_unit_range_loads_and_int32_tiff_is_refused(tmp_path):
    g = _gray8(tmp_path)
    Image.fromarray(g.astype(np.float32) / 255.0, "F").save(tmp_path / "f.tif")
    assert np.array_equal(load_image(str(tmp_path / "f.tif"), CFG), load_image(str(tmp_path / "g8.png"), CFG))
    Image.fromarray(g.astype(np.float32) * 10, "F").save(tmp_path / "big.tif")
    with pytest.raises(CladError, match=r"big\.tif: float image with values outside"):
        load_rgb(str(tmp_path / "big.tif"))
    Image.fromarray(g.astype(np.int32) * 1000, "I").save(tmp_path / "i32.tif")
    with pytest.raises(CladError, match=r"i32\.tif: .*cannot be scaled"):
        load_rgb(str(tmp_path / "i32.tif"))


def _bomb_png(path, side=40000):
    """A valid PNG header declaring side x side pixels (1.6 G), with a tiny body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_is_one_line_naming_the_file(tmp_path):
    _bomb_png(tmp_path / "bomb.png")
    with pytest.raises(CladError, match=r"bomb\.png: refused as a possible decompression bomb"):
        load_rgb(str(tmp_path / "bomb.png"))


def test_tiny_images_are_refused(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(CladError, match=r"dot\.png: image is 1x1 px"):
        load_rgb(str(tmp_path / "dot.png"))


def test_score_skips_a_bomb_and_exits_2_when_nothing_was_readable(trained, tmp_path):
    _bomb_png(tmp_path / "bomb.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    res = clad("score", str(trained), "--run", "t", str(tmp_path / "bomb.png"), str(tmp_path / "junk.png"),
               "--out", str(tmp_path / "out"), check=False)
    assert res.returncode == 2, res.stderr
    assert "bomb.png: refused" in res.stderr and "none of the 2 images could be read" in res.stderr
    assert "Traceback" not in res.stderr


def test_hub_stays_offline_even_after_timm_is_imported():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = ("import pipeline.cli, stages.extract.backbone, timm, huggingface_hub.constants as c; "
            "assert c.HF_HUB_OFFLINE, 'online'; print('offline')")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "offline" in res.stdout, res.stderr

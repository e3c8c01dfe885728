"""Out-of-range settings are refused with one line when the configuration is read, never remembered."""

import json
import re

import pytest

from core.errors import CladError
from pipeline.config import apply_sets, config_from_dict
from tests.conftest import clad


@pytest.mark.parametrize("section, values, message", [
    ("features", {"embed_dim": -4}, "features.embed_dim = -4: must be >= 1"),
    ("features", {"shard_images": 0}, "features.shard_images = 0: must be >= 1"),
    ("features", {"resize": 256, "crop": 300}, "features.crop = 300: must be 0 (no crop) or 32 .. resize"),
    ("train", {"holdout": 1.5}, "train.holdout = 1.5: must be in [0, 1)"),
    ("evaluate", {"sigma": -1.0}, "evaluate.sigma = -1.0: must be >= 0"),
    ("synthesis", {"beta_min": 0.9, "beta_max": 0.8}, "synthesis.beta_min = 0.9"),
    ("calibrate", {"quantile": 0.0}, "calibrate.quantile = 0.0: must be in (0, 1]"),
])
def test_bad_values_are_one_line_naming_the_setting(section, values, message):
    with pytest.raises(CladError, match=re.escape(message)):
        config_from_dict({section: values})


def test_bad_set_is_refused_and_not_remembered(trained):
    res = clad("train", str(trained), "--run", "t", "--set", "knn.knn_k=0", "--head", "knn", check=False)
    assert res.returncode == 2 and "knn_k" in res.stderr and "Traceback" not in res.stderr
    res = clad("train", str(trained), "--run", "t2", "--set", "holdout=1.5", check=False)
    assert res.returncode == 2 and "train.holdout = 1.5" in res.stderr
    overrides = trained / "runs" / "t2" / "overrides.json"
    assert not overrides.exists() or "1.5" not in json.dumps(json.loads(overrides.read_text()))
    with pytest.raises(CladError, match="knn_k"):
        apply_sets(config_from_dict({}), ["knn.knn_k=0"])

"""The configuration reader checks every value's type against its setting: true is not 1, a list is not text."""

import re

import pytest

from core.errors import CladError
from pipeline.config import Config, apply_sets, config_from_dict, save_config
from tests.conftest import clad


@pytest.mark.parametrize("section, key, value, words", [
    ("evaluate", "sigma", True, "must be float (a finite number), got True"),
    ("features", "shard_images", False, "must be int (a whole number), got False"),
    ("features", "backbone", ["resnet18"], "must be str (text), got ['resnet18']"),
    ("data", "textures", {"a": 1}, "must be str (text)"),
    ("evaluate", "sigma", [4.0], "must be float (a finite number)"),
    ("data", "classes", ["a", ["b"]], "an element of 'classes' must be str (text)"),
    ("train", "seed", 1.5, "must be int (a whole number)"),
    ("evaluate", "sigma", float("inf"), "must be float (a finite number), got inf"),
    ("evaluate", "sigma", float("nan"), "must be float (a finite number), got nan"),
])
def test_wrong_types_are_refused_when_the_file_is_read(section, key, value, words):
    with pytest.raises(CladError, match=rf"config.toml \[{section}\].*{key}") as exc:
        config_from_dict({section: {key: value}}, "config.toml")
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_wrong_types_are_refused_on_the_command_line():
    with pytest.raises(CladError, match=re.escape("'sigma' must be float (a finite number), got True")):
        apply_sets(Config(), ["evaluate.sigma=true"])
    with pytest.raises(CladError, match=re.escape("'backbone' must be str (text)")):
        apply_sets(Config(), ['features.backbone=["a", "b"]'])
    cfg = apply_sets(Config(), ["evaluate.sigma=2", "features.backbone=resnet18", "data.textures=2024"])
    assert cfg.evaluate.sigma == 2.0 and cfg.features.backbone == "resnet18" and cfg.data.textures == "2024"


def test_status_on_a_config_with_sigma_true_is_one_line(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    save_config(Config(), work / "config.toml")
    text = (work / "config.toml").read_text().replace("sigma = 4.0", "sigma = true")
    assert "sigma = true" in text
    (work / "config.toml").write_text(text)
    res = clad("status", str(work), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "'sigma' must be float (a finite number), got True" in res.stderr.strip()


def test_messages_name_commands_that_exist(tmp_path):
    from pipeline.config import load_config
    from stages.extract.data import load_image

    (tmp_path / "config.toml").write_text("[data\nroot = 1\n")
    with pytest.raises(CladError, match=rf"write a new one with 'clad init {tmp_path} --data PATH --force'"):
        load_config(tmp_path / "config.toml")
    with pytest.raises(CladError) as exc:
        load_image(str(tmp_path / "gone.png"), Config().features)
    assert "re-index" not in str(exc.value) and "restore the file" in str(exc.value)


def test_sets_every_head_reads_or_that_moved_are_not_refused():
    from pipeline.config import check_sets_used, with_run_choices

    cfg = with_run_choices(Config(), head="knn")
    check_sets_used(cfg, ["knn_k=3", "knn.knn_k=3", "seed=2", "holdout=0.1", "threshold_quantile=0.99",
                          "evaluate.sigma=2", "data.labels=pseudo"])
    with pytest.raises(CladError, match="is a setting of clad, rlr"):
        check_sets_used(cfg, ["lr=1e-3"])

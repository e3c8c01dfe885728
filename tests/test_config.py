from dataclasses import replace

import pytest

from core.errors import CladError
from pipeline.config import (
    Config,
    FeatureConfig,
    TrainConfig,
    apply_sets,
    config_from_dict,
    config_to_dict,
    dump_toml,
    load_config,
    save_config,
)


def test_training_change_keeps_extract_key_but_changes_train_key():
    cfg = Config()
    other = replace(cfg, train=replace(cfg.train, lr=1e-3))
    assert other.extract_key() == cfg.extract_key()
    assert other.train_key() != cfg.train_key()


def test_labels_are_training_only_and_backbone_invalidates_extraction():
    cfg = Config()
    pseudo = replace(cfg, data=replace(cfg.data, labels="pseudo"))
    assert pseudo.extract_key() == cfg.extract_key()
    assert pseudo.train_key() != cfg.train_key()
    lite1 = replace(cfg, features=replace(cfg.features, backbone="tf_efficientnet_lite1"))
    assert lite1.extract_key() != cfg.extract_key()


def test_toml_round_trip(tmp_path):
    cfg = Config(features=FeatureConfig(layers=(1, 2), crop=0))
    save_config(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml") == cfg


def test_unknown_keys_are_errors():
    with pytest.raises(CladError, match="unknown setting.*bakbone"):
        config_from_dict({"features": {"bakbone": "x"}})
    with pytest.raises(CladError, match="unknown section"):
        config_from_dict({"feature": {}})


def test_profile_then_explicit_values_then_set():
    cfg = config_from_dict({"train": {"profile": "fast", "lr": 1e-3}})
    assert cfg.train.epochs_contrastive == 2 and cfg.train.lr == 1e-3
    cfg = apply_sets(cfg, ["margin=2", "evaluate.sigma=2.5", "use_gas=false"])
    assert cfg.train.margin == 2.0 and cfg.evaluate.sigma == 2.5 and cfg.train.use_gas is False
    with pytest.raises(CladError, match="must be int"):
        apply_sets(cfg, ["epochs_finetune=abc"])
    with pytest.raises(CladError, match="unknown profile"):
        config_from_dict({"train": {"profile": "fastest"}})


def test_train_overrides_only_writes_what_differs_from_profile():
    cfg = config_from_dict({"train": {"profile": "fast", "margin": 3.0}})
    tree = config_to_dict(cfg, train_overrides_only=True)
    assert tree["train"] == {"profile": "fast", "margin": 3.0}
    assert "margin = 3.0" in dump_toml(tree)
    assert TrainConfig().epochs_contrastive == 200  # the paper's schedule is the default


def test_each_head_is_keyed_by_its_own_settings():
    knn = Config(train=replace(TrainConfig(), head="knn"))
    # a CLAD-only change (or a change of the CLAD defaults) leaves a knn run current ...
    assert replace(knn, train=replace(knn.train, lr=1e-3, gas_scale="absolute")).train_key() == knn.train_key()
    assert replace(knn, data=replace(knn.data, labels="pseudo")).train_key() == knn.train_key()
    # ... a knn setting does not
    assert replace(knn, train=replace(knn.train, knn_k=3)).train_key() != knn.train_key()
    assert replace(knn, train=replace(knn.train, holdout=0.1)).train_key() != knn.train_key()


def test_a_setting_added_later_is_keyed_only_when_changed():
    cfg = Config()
    assert "score_loss" not in cfg.train_settings()["train"]  # runs trained before it existed stay current
    bce = replace(cfg, train=replace(cfg.train, score_loss="bce"))
    assert bce.train_settings()["train"]["score_loss"] == "bce" and bce.train_key() != cfg.train_key()


def test_word_settings_are_checked_when_read():
    with pytest.raises(CladError, match="'score_loss' must be one of hinge, bce; got 'foo'"):
        apply_sets(Config(), ["score_loss=foo"])
    with pytest.raises(CladError, match="'compressor' must be one of lz4, zstd, none"):
        config_from_dict({"features": {"compressor": "gzip"}})


def test_diffs_name_later_added_settings_with_their_old_value():
    from pipeline.config import diff_settings

    cfg = Config()
    bce = replace(cfg, train=replace(cfg.train, score_loss="bce"))
    assert diff_settings(cfg.train_settings(keyed=False), bce.train_settings(keyed=False)) == [
        "train.score_loss: 'hinge' -> 'bce'"]

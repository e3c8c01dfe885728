import re
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
from stages.heads import run_changes, run_key, run_settings


def with_head(cfg: Config, name: str = "", **values) -> Config:
    """``cfg`` with some of head ``name``'s settings changed (default: the selected head)."""
    name = name or cfg.train.head
    heads = cfg.train.all_heads() | {name: replace(cfg.train.head_settings(name), **values)}
    return replace(cfg, train=replace(cfg.train, heads=heads))


def test_training_change_keeps_extract_key_but_changes_train_key():
    cfg = Config(train=replace(TrainConfig(), head="clad"))  # the CLAD head's settings
    other = with_head(cfg, lr=1e-3)
    assert other.extract_key() == cfg.extract_key()
    assert run_key(other) != run_key(cfg)


def test_labels_are_training_only_and_backbone_invalidates_extraction():
    cfg = Config(train=replace(TrainConfig(), head="clad"))  # the CLAD head's settings
    pseudo = replace(cfg, data=replace(cfg.data, labels="pseudo"))
    assert pseudo.extract_key() == cfg.extract_key()
    assert run_key(pseudo) != run_key(cfg)
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
    cfg = config_from_dict({"train": {"profile": "fast", "head": "clad", "lr": 1e-3}})
    clad = cfg.train.head_settings()
    assert clad.epochs_contrastive == 1 and clad.epochs_finetune == 8 and clad.lr == 1e-3  # fast, then the table
    cfg = apply_sets(cfg, ["margin=2", "evaluate.sigma=2.5", "use_gas=false"])
    clad = cfg.train.head_settings()
    assert clad.margin == 2.0 and cfg.evaluate.sigma == 2.5 and clad.use_gas is False
    with pytest.raises(CladError, match="must be int"):
        apply_sets(cfg, ["epochs_finetune=abc"])
    with pytest.raises(CladError, match=re.escape("config [train]: train.profile = 'fastest': "
                                                  "must be one of fast, long, paper; fix config.toml or --set")):
        config_from_dict({"train": {"profile": "fastest"}})


def test_train_overrides_only_writes_what_differs_from_profile():
    cfg = config_from_dict({"train": {"profile": "fast", "head": "clad", "margin": 3.0}})
    tree = config_to_dict(cfg, train_overrides_only=True)
    assert tree["train"] == {"profile": "fast", "head": "clad", "clad": {"margin": 3.0}}
    assert "[train.clad]\nmargin = 3.0" in dump_toml(tree)
    assert TrainConfig().head_settings("clad").epochs_contrastive == 200  # the paper's schedule is the default


def test_a_flat_setting_reaches_every_head_that_declares_it():
    cfg = config_from_dict({"train": {"knn_k": 3, "routed_knn": {"knn_k": 5}}})
    assert cfg.train.head_settings("knn").knn_k == 3  # as in files written before heads shared names
    assert cfg.train.head_settings("routed_knn").knn_k == 5  # a head's own table wins
    both = apply_sets(Config(), ["knn_k=2"])
    assert both.train.head_settings("knn").knn_k == 2 and both.train.head_settings("routed_knn").knn_k == 2
    one = apply_sets(Config(), ["knn.knn_k=4"])
    assert one.train.head_settings("knn").knn_k == 4 and one.train.head_settings("routed_knn").knn_k == 1


def test_each_head_is_keyed_by_its_own_settings():
    knn = Config(train=replace(TrainConfig(), head="knn"))
    # a CLAD-only change (or a change of the CLAD defaults) leaves a knn run current ...
    assert run_key(with_head(knn, "clad", lr=1e-3, gas_scale="absolute")) == run_key(knn)
    assert run_key(replace(knn, data=replace(knn.data, labels="pseudo"))) == run_key(knn)
    # ... a knn setting does not
    assert run_key(with_head(knn, knn_k=3)) != run_key(knn)
    assert run_key(replace(knn, train=replace(knn.train, holdout=0.1))) != run_key(knn)
    # and a knn setting leaves a CLAD run current
    cfg = Config(train=replace(TrainConfig(), head="clad"))  # the CLAD head's settings
    assert run_key(with_head(cfg, "knn", knn_k=3, knn_coreset=0.5)) == run_key(cfg)


def test_a_setting_added_later_is_keyed_only_when_changed():
    cfg = Config(train=replace(TrainConfig(), head="clad"))  # the CLAD head's settings
    assert "score_loss" not in run_settings(cfg)["clad"]  # runs trained before it existed stay current
    bce = with_head(cfg, score_loss="bce")
    assert run_settings(bce)["clad"]["score_loss"] == "bce" and run_key(bce) != run_key(cfg)


def test_word_settings_are_checked_when_read():
    with pytest.raises(CladError, match=re.escape("--set [train.clad]: train.clad.score_loss = 'foo': "
                                                  "must be one of hinge, bce; fix config.toml or --set")):
        apply_sets(Config(), ["score_loss=foo"])
    with pytest.raises(CladError, match=re.escape("config [features]: features.compressor = 'gzip': "
                                                  "must be one of lz4, zstd, none; fix config.toml or --set")):
        config_from_dict({"features": {"compressor": "gzip"}})


def test_diffs_name_later_added_settings_with_their_old_value():
    cfg = Config(train=replace(TrainConfig(), head="clad"))  # the CLAD head's settings
    assert run_changes(cfg, with_head(cfg, score_loss="bce")) == ["train.clad.score_loss: 'hinge' -> 'bce'"]


def test_a_run_recorded_before_an_added_setting_keeps_the_older_behaviour():
    """routed_knn's ``select`` came after runs existed: a complete head table
    without it (a run's config.toml written then) reads as the older rule,
    ``mean``, so that run stays current; a user's partial table gets today's
    default, ``cells``."""
    from dataclasses import asdict

    from stages.heads import head_class

    recorded = {k: v for k, v in asdict(head_class("routed_knn").settings_class()).items() if k != "select"}
    old = config_from_dict({"train": {"head": "routed_knn", "routed_knn": recorded}})
    assert old.train.head_settings("routed_knn").select == "mean"
    partial = config_from_dict({"train": {"head": "routed_knn", "routed_knn": {"images": 8}}})
    assert partial.train.head_settings("routed_knn").select == "cells"
    assert config_from_dict({}).train.head_settings("routed_knn").select == "cells"

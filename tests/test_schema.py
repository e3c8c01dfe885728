"""One schema: every setting of every section and of every registered head, walked field by field.

For each field: it is declared with ``core.schema.setting``; a changed value
survives config.toml (written, read back) and changes the key that depends on
it (the extract, evaluation or calibration key for a section, the run key for
a head's or a run-level setting) while other heads' keys stay; a head's value
survives a real checkpoint of that head (built here from tiny hand-made
inputs, no training); an older value (``added``) is not hashed and fills in
what older tables and checkpoints lack; a value the declaration does not
allow is refused in the one message format, from config.toml and ``--set``.
A step forgotten when a setting is added fails here; the default configs'
keys are compared with the pinned ones (tests/keys_pinned.json).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core.errors import CladError
from core.schema import added_values, keyed, record, rule_of, rules, words
from core.settings import PROFILE_NAMES, Config, DataConfig, TrainConfig
from core.schema import toml_value as _toml_value
from pipeline.config import apply_sets, config_from_dict, load_config, save_config, with_run_choices
from stages.heads import head_class, head_names, run_key, run_settings
from stages.heads.registry import HEADS, register_head
from stages.train.calibrate import calibration_key

SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}
NOT_SETTINGS = {("train", "heads")}  # the head tables, each head's own settings class
SECTION_FIELDS = [(s, f.name) for s, cls in SECTIONS.items() for f in fields(cls) if (s, f.name) not in NOT_SETTINGS]
HEAD_FIELDS = [(h, f.name) for h in head_names() for f in fields(head_class(h).settings_class)]
# settings that do not enter their section's key, and where they are read instead
UNKEYED = {("data", "labels"): "training only: the run key of heads that use labels",
           ("calibrate", "overrides"): "read when verdicts are made, never baked in (stages/train/calibrate.py)"}
FORMAT = r"^{where}: {table}\.{name} = .+: must be .+; fix config\.toml or --set$"


# -- values -------------------------------------------------------------------------------
def _candidates(default: Any, rule: Any) -> list[Any]:
    if rule.choices is not None:
        return [w for w in rule.words() if w != default]
    if isinstance(default, bool):
        return [not default]
    if isinstance(default, int):
        return [default * 2, default + 1, default + 2, default - 1, 1, 3]
    if isinstance(default, float):
        return [default * 2, default / 2, default + 0.1, default - 0.1, 0.5, 0.25]
    if isinstance(default, str):
        return [default + "x"]
    if default and all(isinstance(v, int) for v in default):
        return [tuple(v + 1 for v in default), default[:-1], (1,)]
    return [default + ("x",), default[:-1]]


def changed(obj: Any, name: str) -> Any:
    """``obj`` with setting ``name`` at another value its declaration allows."""
    rule = rule_of(next(f for f in fields(obj) if f.name == name))
    default = getattr(obj, name)
    for value in _candidates(default, rule):
        if value == default:
            continue
        try:
            return replace(obj, **{name: value})
        except CladError:
            continue
    pytest.fail(f"{type(obj).table}.{name}: no allowed value other than {default!r} found; extend _candidates")


def _bad_values(default: Any, rule: Any) -> tuple[list[Any], list[Any]]:
    """(values each refused, values of which at least one is refused: ``check`` rules)."""
    each = []
    if rule.choices is not None:
        each.append("no-such-word")
    if rule.low is not None:
        each.append(rule.low - 1)
    if rule.high is not None:
        each.append(rule.high + 1)
    if rule.above is not None:
        each.append(rule.above)
    if rule.below is not None:
        each.append(rule.below)
    if rule.odd:
        each.append(max(default, rule.low or 0) + 1 if default % 2 else default)
    if isinstance(default, tuple):
        each = [(v,) for v in each] + ([()] if rule.nonempty else [])
    some = [default * 1000 + 1, -1] if rule.check is not None else []
    return each, some


def _where_and_raw(section: str, name: str, value: Any) -> list[tuple[str, str, Any]]:
    """(message prefix, table, how to apply) for config.toml and --set."""
    if section in HEADS:
        return [(f"config [train] [train.{section}]", f"train.{section}",
                 lambda: config_from_dict({"train": {section: {name: value}}})),
                (f"--set [train.{section}]", f"train.{section}",
                 lambda: apply_sets(Config(), [f"{section}.{name}={_toml_value(value)}"]))]
    return [(f"config [{section}]", section, lambda: config_from_dict({section: {name: value}})),
            ("--set", section, lambda: apply_sets(Config(), [f"{section}.{name}={_toml_value(value)}"]))]


def _refused(section: str, name: str, value: Any) -> bool:
    for where, table, apply in _where_and_raw(section, name, value):
        try:
            apply()
        except CladError as exc:
            assert re.match(FORMAT.format(where=re.escape(where), table=re.escape(table), name=name), str(exc)), exc
            continue
        return False
    return True


def with_head(cfg: Config, head: str, settings: Any) -> Config:
    return replace(cfg, train=replace(cfg.train, heads=cfg.train.all_heads() | {head: settings}))


def head_config(head: str) -> Config:
    return Config(train=replace(TrainConfig(), head=head))


def _round_trip(cfg: Config, tmp_path: Path) -> list[Config]:
    out = []
    for overrides_only in (False, True):
        save_config(cfg, tmp_path / "config.toml", train_overrides_only=overrides_only)
        out.append(load_config(tmp_path / "config.toml"))
    return out


# -- declarations -------------------------------------------------------------------------
def test_every_field_is_declared_once_with_setting():
    for cls in [*SECTIONS.values(), *(head_class(h).settings_class for h in head_names())]:
        undeclared = [f.name for f in fields(cls) if rule_of(f) is None and (cls.table, f.name) not in NOT_SETTINGS]
        assert not undeclared, f"{cls.table}: declare {undeclared} with core.schema.setting"
    assert [cls.table for cls in SECTIONS.values()] == list(SECTIONS)
    assert all(head_class(h).settings_class.table == f"train.{h}" for h in head_names())


def test_each_head_added_dict_is_derived_from_its_fields():
    for h in head_names():
        cls = head_class(h)
        assert cls.added == HEADS[h].added == added_values(cls.settings_class)
        assert all(not callable(v) for v in cls.added.values())

    from stages.heads.base import Head
    from stages.heads.knn import KnnSettings

    hand_written = type("Hand", (Head,), {"name": "hand", "settings_class": KnnSettings, "added": {"knn_k": 1}})
    with pytest.raises(ValueError, match="setting\\(..., added=VALUE\\)"):
        register_head(hand_written)
    assert "hand" not in HEADS and KnnSettings.table == "train.knn"


def test_word_lists_elsewhere_are_the_declared_ones():
    from pipeline.cli import train
    from stages.extract.data import INDEXERS

    assert set(words(DataConfig, "layout")) == {"auto", *INDEXERS}
    assert words(TrainConfig, "profile") == PROFILE_NAMES
    assert tuple(next(p for p in train.params if p.name == "profile").type.choices) == PROFILE_NAMES
    assert set(words(TrainConfig, "head")) == set(head_names())


def test_core_does_not_import_stages_or_pipeline():
    for path in (Path(__file__).resolve().parents[1] / "core").glob("*.py"):
        assert not re.search(r"(?m)^\s*(from|import) (stages|pipeline)\b", path.read_text()), path


def test_the_head_table_is_found_without_importing_the_heads_first():
    import subprocess
    import sys

    code = ("import sys; from core.settings import Config; assert 'stages.heads' not in sys.modules; "
            "c = Config(); print(type(c.train.head_settings()).__name__, len(c.train.all_heads()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout.split()
    assert out == ["RoutedKnnSettings", str(len(head_names()))]


# -- sections -----------------------------------------------------------------------------
@pytest.mark.parametrize("section, name", SECTION_FIELDS)
def test_section_setting_round_trips_and_is_keyed(section, name, tmp_path):
    base = Config()
    cfg = replace(base, **{section: changed(getattr(base, section), name)})
    for back in _round_trip(cfg, tmp_path):
        assert back == cfg and getattr(getattr(back, section), name) == getattr(getattr(cfg, section), name)
    if section in ("data", "features", "synthesis") and (section, name) not in UNKEYED:
        assert cfg.extract_key() != base.extract_key()
    elif section == "evaluate":
        assert cfg.evaluate_key("k") != base.evaluate_key("k")
    elif (section, name) in (("calibrate", "seen_shift"), ("calibrate", "seen_own_floor")):
        # keyed where a head has seen images (test_calibrate)
        learned = replace(base.train, head="clad")
        assert (calibration_key(replace(cfg, train=learned), "k") != calibration_key(replace(base, train=learned), "k"))
    elif section == "calibrate" and (section, name) not in UNKEYED:
        assert calibration_key(cfg, "k") != calibration_key(base, "k")
    elif (section, name) == ("data", "labels"):
        assert cfg.extract_key() == base.extract_key()
        for h in head_names():
            moved = run_key(replace(cfg, train=replace(cfg.train, head=h))) != run_key(head_config(h))
            assert moved == head_class(h).uses_labels, h
    elif (section, name) == ("calibrate", "overrides"):
        assert calibration_key(cfg, "k") == calibration_key(base, "k")
    elif section == "train":
        for h in head_names():
            before, after = head_config(h), replace(cfg, train=replace(cfg.train, head=h))
            if name == "head":
                after = cfg
                moved_expected = cfg.train.head != h
            elif name == "profile":
                moved_expected = HEADS[h].defaults(cfg.train.profile) != HEADS[h].defaults(base.train.profile)
            else:
                moved_expected = name in head_class(h).reads
            assert (run_key(after) != run_key(before)) == moved_expected, (h, name)
    else:
        pytest.fail(f"{section}.{name}: which key does it enter? (add it here, or to UNKEYED with why)")
    rule = rules(SECTIONS[section])[name]
    if name in added_values(SECTIONS[section]):
        at_old = replace(base, **{section: replace(getattr(base, section), **{name: rule.added})})
        assert name not in keyed(getattr(at_old, section))


@pytest.mark.parametrize("section, name", SECTION_FIELDS)
def test_section_setting_refuses_what_it_does_not_allow(section, name):
    rule = rules(SECTIONS[section])[name]
    each, some = _bad_values(getattr(SECTIONS[section](), name), rule)
    for value in each:
        assert _refused(section, name, value), f"{section}.{name} = {value!r} was accepted"
    assert not some or any(_refused(section, name, v) for v in some)


# -- heads ----------------------------------------------------------------------------------
def _build_clad(t):
    from stages.heads.clad import CladHead, build_model

    return CladHead(build_model(8, 2, t), t, {"head": "clad", "embed_dim": 8,
                                                                         "n_labels": 2}, torch.device("cpu"))


def _build_knn(t):
    from stages.heads.knn import KnnHead

    return KnnHead(np.zeros((4, 8), np.float32), t, {"head": "knn", "embed_dim": 8}, np.arange(4))


def _build_routed_knn(t):
    from stages.heads.routed_knn import RoutedKnnHead

    c, d = 8, max(1, min(t.project, 8))
    rows = np.arange(6 * c, dtype=np.float32).reshape(6, c)
    axes = (np.zeros(c, np.float32), np.eye(c, d, dtype=np.float32))
    return RoutedKnnHead(rows, np.array([0, 3, 6]), rows[[0, 3]], np.array([0, 1]), t,
                         {"head": "routed_knn", "embed_dim": c, "class_names": ["a", "b"], "grid": [1, 3]},
                         np.array([0, 1]), np.zeros((2, 16, c), np.float32), axes)


def _build_rlr(t):
    from stages.heads.rlr import RlrHead, _build

    return RlrHead(_build(8, (4, 4), t), t, {"head": "rlr", "embed_dim": 8, "grid": [4, 4]}, torch.device("cpu"))


# a real head from tiny inputs, and small settings to start from (the paper's sizes cost seconds per model)
BUILD = {"clad": (_build_clad, {"adaptor_dims": (16,), "disc_hidden": 8}), "knn": (_build_knn, {}),
         "routed_knn": (_build_routed_knn, {}),
         "rlr": (_build_rlr, {"dim": 16, "layers": 1, "attn_heads": 2, "window": 3, "proj_blocks": 1})}


def test_every_head_has_a_checkpoint_builder_here():
    assert set(BUILD) == set(head_names()), "add a tiny builder of the new head to BUILD"


def _checkpoint_round_trip(head: str, settings: Any) -> Any:
    built = BUILD[head][0](settings)
    buf = io.BytesIO()
    torch.save(built.checkpoint(), buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu", weights_only=True)
    assert ckpt["meta"]["settings"] == json.loads(json.dumps(record(settings)))  # plain values: the dataclass
    return head_class(head).from_checkpoint(ckpt, torch.device("cpu")).settings


@pytest.mark.parametrize("head, name", HEAD_FIELDS)
def test_head_setting_round_trips_is_keyed_and_survives_the_checkpoint(head, name, tmp_path):
    base = head_config(head)
    settings = changed(base.train.head_settings(), name)
    cfg = with_head(base, head, settings)
    for back in _round_trip(cfg, tmp_path):
        assert back.train.head_settings(head) == settings and run_key(back) == run_key(cfg)
    assert run_key(cfg) != run_key(base)
    for other in head_names():  # another head's run stays current
        if other != head:
            assert run_key(replace(cfg, train=replace(cfg.train, head=other))) == run_key(head_config(other))
    small = replace(base.train.head_settings(), **BUILD[head][1])
    assert _checkpoint_round_trip(head, changed(small, name)) == changed(small, name)
    added = head_class(head).added
    if name in added:
        older = with_head(base, head, replace(settings, **{name: added[name]}))
        assert name not in run_settings(older)[head]  # runs made before it existed keep their keys
        recorded = {k: v for k, v in asdict(settings).items() if k != name}  # a run's table written then
        back = config_from_dict({"train": {"head": head, head: recorded}})
        assert getattr(back.train.head_settings(head), name) == added[name]
        meta = {"settings": {k: v for k, v in record(settings).items() if k != name}}
        assert getattr(head_class(head).settings_from_meta(meta), name) == added[name]


@pytest.mark.parametrize("head, name", HEAD_FIELDS)
def test_head_setting_refuses_what_it_does_not_allow(head, name):
    cls = head_class(head).settings_class
    each, some = _bad_values(getattr(cls(), name), rules(cls)[name])
    for value in each:
        assert _refused(head, name, value), f"train.{head}.{name} = {value!r} was accepted"
    assert not some or any(_refused(head, name, v) for v in some)


def test_default_configurations_keep_their_pinned_keys():
    """A new setting whose default hashed would move these: declare ``added=`` (the older behaviour)."""
    pinned = json.loads(Path(__file__).with_name("keys_pinned.json").read_text())
    base = config_from_dict({})
    assert base.extract_key() == pinned["bare/extract"]
    for head in head_names():
        for profile in PROFILE_NAMES:
            assert run_key(with_run_choices(base, profile, head)) == pinned[f"bare/{head}/{profile}/default"]["run"]


def test_checkpoints_written_before_meta_settings_still_load():
    """What the heads' code stored before meta["settings"]: a few settings at the top of meta."""
    clad = head_class("clad").settings_from_meta({"head": "clad", "embed_dim": 8, "n_labels": 2,
                                                  "adaptor_dims": [64, 32], "disc_hidden": 16, "class_names": []})
    assert clad.adaptor_dims == (64, 32) and clad.disc_hidden == 16 and clad.score_loss == "hinge"
    assert clad.mix_classes is False and clad.bn_refresh is False  # their older behaviour
    assert head_class("knn").settings_from_meta({"head": "knn", "knn_k": 3, "bank_rows": 9}).knn_k == 3
    rlr = head_class("rlr").settings_from_meta({"head": "rlr", "embed_dim": 8, "grid": [4, 4], "dim": 32,
                                                "layers": 1, "heads": 2, "window": 3, "mask_prob": 0.25,
                                                "proj_blocks": 1, "ffn_mult": 2, "error": "l2"})
    assert (rlr.dim, rlr.layers, rlr.attn_heads, rlr.window, rlr.mask_prob, rlr.error) == (32, 1, 2, 3, 0.25, "l2")
    routed = head_class("routed_knn").settings_from_meta(
        {"settings": {"images": 8, "route": True, "knn_k": 1, "rerank": 4}})  # before select, project, refine
    assert (routed.images, routed.select, routed.project, routed.refine) == (8, "mean", 0, 0.0)
    with pytest.raises(CladError, match="knn checkpoint: setting\\(s\\) nope unknown"):
        head_class("knn").settings_from_meta({"settings": {"knn_k": 1, "nope": 2}})


def test_an_added_setting_keeps_older_keys_and_fills_complete_older_tables():
    """The mechanism a new section or head setting uses (no section has one yet): at its
    ``added`` value it is left out of the hash; a complete table written before it existed
    (a run's config.toml) reads as that value, a partial one (a user's edit) as the default."""
    from dataclasses import dataclass

    from core.schema import Settings, setting
    from pipeline.config import _fill_added

    @dataclass(frozen=True)
    class Demo(Settings):
        table = "demo"
        old: int = setting(1, low=0)
        new: str = setting("better", choices=("older", "better"), added="older")

    assert keyed(Demo()) == {"old": 1, "new": "better"} and keyed(Demo(new="older")) == {"old": 1}
    assert _fill_added(Demo, {"old": 3}) == {"old": 3, "new": "older"} and _fill_added(Demo, {}) == {}
    with pytest.raises(CladError, match=re.escape("demo.new = 'x': must be one of older, better; fix config.toml")):
        Demo(new="x")


def test_clad_settings_lists_every_setting_with_its_default_allowed_values_and_help():
    from click.testing import CliRunner

    from pipeline.cli import main

    res = CliRunner().invoke(main, ["settings", "clad", "features", "--profile", "fast"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    fast = head_class("clad").profiles["fast"]
    for f in dataclasses.fields(head_class("clad").settings_class):
        line = next(ln for ln in lines if ln.startswith(f"train.clad.{f.name} = "))
        rule = rule_of(f)
        if rule.help:
            assert rule.help in line
        if rule.choices is not None:
            assert "one of " + ", ".join(rule.words()) in line
    assert "train.clad.epochs_contrastive = %d " % fast["epochs_contrastive"] in res.output
    assert 'features.compressor = "lz4"  (one of lz4, zstd, none)  cache compression' in lines
    bad = CliRunner().invoke(main, ["settings", "nope"])
    assert bad.exit_code != 0 and "unknown table 'nope'" in bad.output

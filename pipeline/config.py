"""Assembling the configuration: TOML in and out, profiles, ``--set``.

The settings dataclasses and their cache keys live in ``core.settings`` (so
that stages and cache import them without reaching up here); this module
reads and writes them and checks every value when it is read.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from core.errors import CladError
from core.files import write_atomic
from core.schema import added_values, toml_value
from core.settings import (
    CalibrateConfig,
    Config,
    DataConfig,
    EvaluateConfig,
    FeatureConfig,
    SynthesisConfig,
    TrainConfig,
    diff_settings,
    norm_value,
    settings_hash,
)
from pipeline.values import coerce
from stages.heads.registry import HEADS  # the head table (importing it registers every head)

__all__ = ["CalibrateConfig", "Config", "DataConfig", "EvaluateConfig", "FeatureConfig", "SynthesisConfig",
           "TrainConfig", "diff_settings", "settings_hash", "write_atomic"]

_SECTION_TYPES: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}  # [data], [features], ...
_COMMON_TRAIN = tuple(f.name for f in fields(TrainConfig) if f.name != "heads")
# [train] keys of configurations written before the head registry that now live elsewhere
_MOVED = {"threshold_quantile": ("calibrate", "quantile")}


def section_from_dict(cls: type, raw: dict[str, Any], where: str, base: Any = None) -> Any:
    """Build a section dataclass, refusing unknown keys (typos are errors) and,
    through its declarations, values it does not allow (the message names the file)."""
    known = {f.name for f in fields(cls)} - {"heads"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CladError(
            f"{where}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    base = base if base is not None else cls()
    values = {k: coerce(cls, k, v, where) for k, v in raw.items()}
    try:
        return replace(base, **values)
    except CladError as exc:  # core.schema.check_settings: "<table>.<name> = <value>: must be ..."
        raise CladError(f"{where}: {exc}") from None


def _owners(name: str) -> list[str]:
    """Every head whose settings have ``name`` (``knn_k``: knn and routed_knn)."""
    return [head for head in HEADS if name in {f.name for f in fields(HEADS[head].settings)}]


def _fill_added(cls: type, table: dict[str, Any]) -> dict[str, Any]:
    """A table (a section's or a head's) holding every setting ``cls`` had
    before its ``added`` ones is a complete record written before those
    existed (a run's config.toml): the missing added settings take the value
    that reproduces that run, not today's default. Partial tables (a user's
    overrides) keep the defaults. Returns ``table``, filled in place."""
    added = added_values(cls)
    older = {f.name for f in fields(cls)} - set(added) - {"heads"}
    if added and older <= set(table):
        for k, v in added.items():
            table.setdefault(k, v)
    return table


def train_from_dict(raw: dict[str, Any], where: str, base: TrainConfig | None = None
                    ) -> tuple[TrainConfig, dict[str, Any]]:
    """[train] with its head tables ([train.clad], ...), and the older flat
    spelling (a head's setting directly under [train]), which sets it for
    every head that declares it, so that it means what it meant before heads
    shared names. Returns the section and settings of other sections found
    there (``threshold_quantile``)."""
    raw = dict(raw)
    nested = {k: raw.pop(k) for k in list(raw) if isinstance(raw[k], dict)}
    unknown_heads = sorted(set(nested) - set(HEADS))
    if unknown_heads:
        raise CladError(f"{where}: unknown head table(s) {', '.join(unknown_heads)}; "
                        f"registered heads: {', '.join(HEADS)}")
    base = base or TrainConfig()
    common = section_from_dict(TrainConfig, {k: v for k, v in raw.items() if k in _COMMON_TRAIN}, where, base)
    heads = {n: dict(v) for n, v in nested.items()}
    moved: dict[str, Any] = {}
    for k, v in raw.items():
        if k in _COMMON_TRAIN:
            continue
        if k in _MOVED:
            moved[k] = v
            continue
        owners = _owners(k)
        if not owners:
            valid = sorted(set(_COMMON_TRAIN) | {f.name for h in HEADS.values() for f in fields(h.settings)})
            raise CladError(f"{where}: unknown setting {k}; valid: {', '.join(valid)}")
        for owner in owners:
            heads.setdefault(owner, {}).setdefault(k, v)  # a head's own table wins over the flat spelling
    for n, table in heads.items():
        _fill_added(HEADS[n].settings, table)
    if common.profile != base.profile:
        base_heads = {n: HEADS[n].defaults(common.profile) for n in HEADS}
    else:
        base_heads = base.all_heads()
    settings = {n: section_from_dict(HEADS[n].settings, heads.get(n, {}), f"{where} [train.{n}]", base_heads[n])
                for n in HEADS}
    return replace(common, heads=settings), moved


def config_from_dict(raw: dict[str, Any], where: str = "config") -> Config:
    unknown = sorted(set(raw) - set(_SECTION_TYPES))
    if unknown:
        raise CladError(f"{where}: unknown section(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(_SECTION_TYPES)}")
    train_raw = dict(raw.get("train", {}))
    profile = str(train_raw.get("profile", TrainConfig.profile))
    train, moved = train_from_dict(train_raw, f"{where} [train]",
                                   with_profile(TrainConfig(), profile, f"{where} [train]"))
    calibrate = {_MOVED[k][1]: v for k, v in moved.items()} | dict(raw.get("calibrate", {}))
    parts: dict[str, Any] = {"train": train}
    for name, cls in _SECTION_TYPES.items():
        if name != "train":
            section = calibrate if name == "calibrate" else dict(raw.get(name, {}))
            parts[name] = section_from_dict(cls, _fill_added(cls, section), f"{where} [{name}]")
    return Config(**parts)


def with_run_choices(base: Config, profile: str = "", head: str = "") -> Config:
    """A run's configuration before ``--set``: the profile's schedule, under
    the [train] keys written explicitly in config.toml (those still win)."""
    cfg = base
    if profile:
        explicit = config_to_dict(base, train_overrides_only=True)["train"]
        explicit.pop("profile", None)
        train, _ = train_from_dict(explicit, "config.toml [train]", with_profile(base.train, profile))
        cfg = replace(cfg, train=train)
    if head:
        cfg = replace(cfg, train=section_from_dict(TrainConfig, {"head": head}, "--head", cfg.train))
    return cfg


def with_profile(train: TrainConfig, profile: str, where: str = "--profile") -> TrainConfig:
    """Every head's settings as the profile sets them (run-level settings kept)."""
    train = section_from_dict(TrainConfig, {"profile": profile}, where, train)  # an unknown word is refused
    return replace(train, heads={n: HEADS[n].defaults(profile) for n in HEADS})


def load_config(path: Path) -> Config:
    if not path.is_file():
        raise CladError(f"{path}: no configuration here; create one with 'clad init {path.parent} --data PATH'")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise CladError(f"{path}: not valid TOML ({exc}); fix the file, or write a new one with "
                        f"'clad init {path.parent} --data PATH --force'") from None
    return config_from_dict(raw, str(path))


def config_to_dict(cfg: Config, train_overrides_only: bool = False) -> dict[str, Any]:
    """The configuration as nested dicts (``train`` holds a table per head).
    ``train_overrides_only`` keeps, in [train], only the profile and what
    differs from the defaults (so a later profile change still applies)."""
    out: dict[str, Any] = {name: dataclasses.asdict(getattr(cfg, name)) for name in _SECTION_TYPES if name != "train"}
    train: dict[str, Any] = {k: getattr(cfg.train, k) for k in _COMMON_TRAIN}
    heads = {n: dataclasses.asdict(s) for n, s in cfg.train.all_heads().items()}
    if train_overrides_only:
        default = TrainConfig()
        train = {k: v for k, v in train.items() if k == "profile" or norm_value(getattr(default, k)) != norm_value(v)}
        for n in list(heads):
            base = dataclasses.asdict(HEADS[n].defaults(cfg.train.profile))
            heads[n] = {k: v for k, v in heads[n].items() if norm_value(base[k]) != norm_value(v)}
    out["train"] = train | {n: v for n, v in heads.items() if v}
    order = list(_SECTION_TYPES)
    return {k: out[k] for k in order}


def dump_toml(tree: dict[str, dict[str, Any]]) -> str:
    """Sections of scalars, and one level of sub-tables (``[train.clad]``)."""
    lines = []
    for section, values in tree.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if not isinstance(v, dict)]
        lines.append("")
        for sub, table in values.items():
            if isinstance(table, dict):
                lines.append(f"[{section}.{sub}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
                lines.append("")
    return "\n".join(lines)


def save_config(cfg: Config, path: Path, train_overrides_only: bool = False) -> None:
    write_atomic(path, dump_toml(config_to_dict(cfg, train_overrides_only)))


def apply_sets(cfg: Config, sets: tuple[str, ...] | list[str]) -> Config:
    """Apply ``--set [section.]key=value``. Without a section the key is a
    run-level [train] setting or a setting of every head that declares it
    (only the selected head's enter its run key); ``knn.knn_k=3`` names one head."""
    sections: dict[str, dict[str, Any]] = {}
    for item in sets:
        if "=" not in item:
            raise CladError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=1e-4")
        key, value = item.split("=", 1)
        section, _, name = key.strip().rpartition(".")
        section = section.removeprefix("train.") or "train"
        try:
            parsed: Any = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        if section in HEADS:
            sections.setdefault("train", {}).setdefault(section, {})[name] = parsed
        elif section in _SECTION_TYPES:
            sections.setdefault(section, {})[name] = parsed
        else:
            raise CladError(f"--set {item!r}: unknown section {section!r}; "
                            f"valid: {', '.join([*_SECTION_TYPES, *HEADS])}")
    if "train" in sections:
        train, moved = train_from_dict(sections.pop("train"), "--set", cfg.train)
        cfg = replace(cfg, train=train)
        for k, v in moved.items():
            sections.setdefault(_MOVED[k][0], {})[_MOVED[k][1]] = v
    for section, raw in sections.items():
        cls = _SECTION_TYPES[section]
        cfg = replace(cfg, **{section: section_from_dict(cls, raw, "--set", getattr(cfg, section))})
    return cfg


def check_sets_used(cfg: Config, sets: tuple[str, ...] | list[str]) -> None:
    """Refuse a ``--set`` of a [train] setting that the run's head does not read
    (``--set knn_k=3`` for a CLAD run): accepted, it would be remembered with the
    run and change nothing, silently. Other sections' settings are always used."""
    head = cfg.train.head
    own = {f.name for f in fields(HEADS[head].settings)}
    for item in sets:
        key = item.split("=", 1)[0].strip()
        section, _, name = key.rpartition(".")
        section = section.removeprefix("train.") or "train"
        if section == "train" and (name in _COMMON_TRAIN or name in own or name in _MOVED):
            continue
        if section in HEADS and section != head:
            why = f"names head {section}'s setting"
        elif section == "train":
            why = f"is a setting of {', '.join(_owners(name)) or 'no head'}"
        else:
            continue
        raise CladError(f"--set {item!r}: {why}, but this run trains head {head}, which does not read it; "
                        f"{head}'s settings: {', '.join(sorted(own))} (or pick the head with --head)")

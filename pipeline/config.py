"""Assembling the configuration: TOML in and out, profiles, ``--set``.

The settings dataclasses and their cache keys live in ``core.settings`` (so
that stages and cache import them without reaching up here); this module
reads and writes them and checks every value when it is read.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from core.errors import CladError
from core.files import write_atomic
from core.settings import (
    Config,
    DataConfig,
    EvaluateConfig,
    FeatureConfig,
    SynthesisConfig,
    TrainConfig,
    diff_settings,
    norm_value,
    settings_hash,
    training_changes,
)

__all__ = ["Config", "DataConfig", "EvaluateConfig", "FeatureConfig", "SynthesisConfig", "TrainConfig",
           "diff_settings", "settings_hash", "training_changes", "write_atomic"]

# The fast profile: a short schedule that finishes in minutes on 2 CPU cores.
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {},
    "fast": {
        "epochs_contrastive": 2,
        "epochs_finetune": 4,
        "batch_contrastive": 4000,
        "batch_finetune": 20000,
        "gas_steps": 3,
        "gas_project_every": 3,
    },
    "long": {
        "epochs_contrastive": 4,
        "epochs_finetune": 12,
        "batch_contrastive": 8000,
        "batch_finetune": 50000,
        "gas_steps": 5,
        "gas_project_every": 5,
    },
}


# -- TOML in and out --------------------------------------------------------
_SECTION_TYPES = {
    "data": DataConfig, "features": FeatureConfig, "synthesis": SynthesisConfig,
    "train": TrainConfig, "evaluate": EvaluateConfig,
}


# Settings that take one of a few words: checked when the configuration is read,
# so a typo fails at once with the choices, not deep inside a stage.
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("DataConfig", "layout"): ("auto", "mvtec", "visa", "folder"),
    ("DataConfig", "labels"): ("classes", "pseudo"),
    ("FeatureConfig", "compressor"): ("lz4", "zstd", "none"),
    ("TrainConfig", "head"): ("clad", "knn"),
    ("TrainConfig", "score_loss"): ("hinge", "bce"),
    ("TrainConfig", "gas_scale"): ("nn", "absolute"),
}


def _coerce(cls: type, name: str, value: Any, where: str) -> Any:
    choices = CHOICES.get((cls.__name__, name))
    if choices is not None and value not in choices:
        raise CladError(f"{where}: '{name}' must be one of {', '.join(choices)}; got {value!r}")
    default = next(f for f in fields(cls) if f.name == name).default
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise CladError(f"{where}: '{name}' must be true or false, got {value!r}")
        return value
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise CladError(f"{where}: '{name}' must be a list, got {value!r}")
        elem = type(default[0]) if default else str
        try:
            return tuple(elem(v) for v in value)
        except ValueError as exc:
            raise CladError(f"{where}: '{name}' has a bad element ({exc})") from None
    try:
        if isinstance(default, float):
            return float(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        return str(value)
    except (TypeError, ValueError):
        raise CladError(
            f"{where}: '{name}' must be {type(default).__name__}, got {value!r}") from None


def section_from_dict(cls: type, raw: dict[str, Any], where: str, base: Any = None) -> Any:
    """Build a section dataclass, refusing unknown keys (typos are errors)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CladError(
            f"{where}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    base = base if base is not None else cls()
    return replace(base, **{k: _coerce(cls, k, v, where) for k, v in raw.items()})


def config_from_dict(raw: dict[str, Any], where: str = "config") -> Config:
    unknown = sorted(set(raw) - set(_SECTION_TYPES))
    if unknown:
        raise CladError(f"{where}: unknown section(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(_SECTION_TYPES)}")
    train_raw = dict(raw.get("train", {}))
    profile = str(train_raw.get("profile", TrainConfig.profile))
    parts = {}
    for name, cls in _SECTION_TYPES.items():
        section = raw.get(name, {})
        if name == "train":
            base = with_profile(TrainConfig(), profile, where)
            parts[name] = section_from_dict(cls, section, f"{where} [train]", base)
        else:
            parts[name] = section_from_dict(cls, section, f"{where} [{name}]")
    return Config(**parts)


def with_run_choices(base: Config, profile: str = "", head: str = "") -> Config:
    """A run's configuration before ``--set``: the profile's schedule, under
    the [train] keys written explicitly in config.toml (those still win)."""
    cfg = base
    if profile:
        explicit = config_to_dict(base, train_overrides_only=True)["train"]
        explicit.pop("profile", None)
        train = with_profile(base.train, profile)
        cfg = replace(cfg, train=section_from_dict(TrainConfig, explicit, "config.toml [train]", train))
    if head:
        cfg = replace(cfg, train=replace(cfg.train, head=head))
    return cfg


def with_profile(train: TrainConfig, profile: str, where: str = "--profile") -> TrainConfig:
    if profile not in PROFILES:
        raise CladError(f"{where}: unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return replace(train, profile=profile, **PROFILES[profile])


def load_config(path: Path) -> Config:
    if not path.is_file():
        raise CladError(f"{path}: no configuration here; create one with 'clad init {path.parent} --data PATH'")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise CladError(f"{path}: not valid TOML ({exc}); fix the file or re-run 'clad init --force'") from None
    return config_from_dict(raw, str(path))


def config_to_dict(cfg: Config, train_overrides_only: bool = False) -> dict[str, Any]:
    out = {name: dataclasses.asdict(getattr(cfg, name)) for name in _SECTION_TYPES}
    if train_overrides_only:
        base = dataclasses.asdict(with_profile(TrainConfig(), cfg.train.profile))
        out["train"] = {k: v for k, v in out["train"].items()
                        if k == "profile" or norm_value(base[k]) != norm_value(v)}
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # JSON string escaping is valid TOML basic-string escaping


def dump_toml(tree: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in tree.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def save_config(cfg: Config, path: Path, train_overrides_only: bool = False) -> None:
    write_atomic(path, dump_toml(config_to_dict(cfg, train_overrides_only)))


def apply_sets(cfg: Config, sets: tuple[str, ...] | list[str]) -> Config:
    """Apply ``--set section.key=value`` (section defaults to train)."""
    sections: dict[str, dict[str, Any]] = {}
    for item in sets:
        if "=" not in item:
            raise CladError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=1e-4")
        key, value = item.split("=", 1)
        section, _, name = key.strip().rpartition(".")
        section = section or "train"
        if section not in _SECTION_TYPES:
            raise CladError(f"--set {item!r}: unknown section {section!r}")
        try:
            parsed: Any = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        sections.setdefault(section, {})[name] = parsed
    for section, raw in sections.items():
        cls = _SECTION_TYPES[section]
        cfg = replace(cfg, **{section: section_from_dict(cls, raw, "--set", getattr(cfg, section))})
    return cfg

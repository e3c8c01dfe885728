"""The typed configuration: one frozen dataclass per section, saved as TOML.

Each stage hashes exactly the sections it depends on (``extract_key``,
``train_key``, ``evaluate_key``) so that a training-only change never
invalidates extracted features, while a backbone change does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pipeline.errors import CladError

# Bump when the extraction code changes what it writes for the same settings.
EXTRACT_CODE_VERSION = 1
TRAIN_CODE_VERSION = 1
EVALUATE_CODE_VERSION = 1

MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how classes are labelled."""

    root: str = ""
    textures: str = ""  # folder of texture images (DTD); "" = built-in procedural source
    layout: str = "auto"  # auto | mvtec | visa | folder
    classes: tuple[str, ...] = ()  # empty = every class found
    texture_classes: tuple[str, ...] = MVTEC_TEXTURES + ("weave", "grain", "speckle")
    fg_masks: str = ""  # optional folder <fg>/<class>/<file>: user masks win
    labels: str = "classes"  # classes | pseudo (training only)


@dataclass(frozen=True)
class FeatureConfig:
    """Backbone and patch-feature settings (extraction)."""

    backbone: str = "tf_efficientnet_lite0"
    weights: str = "package"  # package | hub-cache | path/to/state_dict.pth
    layers: tuple[int, ...] = (2, 3)
    resize: int = 256
    crop: int = 224  # 0 = no crop (keeps defects at the border)
    patch: int = 3  # local aggregation neighbourhood p x p
    pretrain_dim: int = 360
    embed_dim: int = 360  # C_d; <= min(C_j * p^2) so pooling never duplicates values
    shard_images: int = 16
    batch_images: int = 8
    compressor: str = "lz4"  # lz4 | zstd | none
    clevel: int = 5


@dataclass(frozen=True)
class SynthesisConfig:
    """GLASS-style local anomaly synthesis (METHOD.md section 1)."""

    variants: int = 2  # synthetic images per normal training image
    beta_mean: float = 0.5
    beta_std: float = 0.1
    beta_min: float = 0.2
    beta_max: float = 0.8
    perlin_max_scale: int = 5  # resolution 2^k, k in 0..max
    perlin_threshold: float = 0.5
    max_tries: int = 50
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Head training; fields default to the paper's schedule ('paper' profile)."""

    profile: str = "paper"
    head: str = "clad"  # clad | knn
    epochs_contrastive: int = 200
    epochs_finetune: int = 2000
    batch_contrastive: int = 8000
    batch_finetune: int = 100000
    lr: float = 2e-4
    weight_decay: float = 1e-2
    adaptor_dims: tuple[int, ...] = (1024, 512, 256)
    disc_hidden: int = 1024
    margin: float = 1.0  # M of eq. 12
    alpha: float = 1.0  # alpha of eqs. 13-14
    gamma: float = -0.8
    delta: float = 0.5  # hinge margin of eqs. 21-23
    score_loss: str = "hinge"  # L_d: hinge (eqs. 21-23) | bce (GLASS: graded, never flat)
    contrast_normals_only: bool = False
    fusion_p: float = 0.5
    gas_steps: int = 20
    gas_eta: float = 0.001
    gas_project_every: int = 5
    gas_noise: float = 0.015
    gas_scale: str = "nn"  # nn: radii in units of the normal NN distance | absolute: METHOD.md's constants
    gas_nn_factor: float = 1.0  # with gas_scale = nn: r1 = factor x median NN distance, r2 = 2 r1
    use_contrastive: bool = True
    use_gas: bool = True
    use_las: bool = True
    holdout: float = 0.05
    window_shards: int = 4
    pseudo_k: int = 0  # 0 = 2 x number of class folders
    knn_coreset: float = 1.0  # fraction of normal rows kept by greedy coreset (knn head); 1.0 = all
    knn_k: int = 1
    threshold_quantile: float = 0.99
    seed: int = 0


# What the knn head reads; every other [train] setting belongs to CLAD.
KNN_SETTINGS = ("head", "holdout", "knn_coreset", "knn_k", "threshold_quantile", "seed")
# Settings added after runs existed, with the value that reproduces the older
# behaviour: hashed only when set otherwise, so upgrading leaves runs current.
ADDED_TRAIN_SETTINGS: dict[str, Any] = {"score_loss": "hinge"}
_UNSET = object()


@dataclass(frozen=True)
class EvaluateConfig:
    """Anomaly maps and metrics."""

    sigma: float = 4.0
    aupro_fpr: float = 0.3
    figures_per_class: int = 3


@dataclass(frozen=True)
class Config:
    """The whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    # -- cache keys -------------------------------------------------------
    def extract_settings(self) -> dict[str, Any]:
        """Exactly what extracted features depend on (labels are training-only)."""
        data = dataclasses.asdict(self.data)
        data.pop("labels")
        return {
            "code": EXTRACT_CODE_VERSION,
            "data": data,
            "features": dataclasses.asdict(self.features),
            "synthesis": dataclasses.asdict(self.synthesis),
        }

    def train_settings(self, keyed: bool = True) -> dict[str, Any]:
        """What a trained head depends on. The knn head reads a handful of
        settings, so changing a CLAD setting (or a CLAD default) never makes a
        knn run stale; a CLAD run hashes every [train] setting. ``keyed=False``
        keeps later-added settings at their defaults too (for showing diffs)."""
        train = dataclasses.asdict(self.train)
        if self.train.head == "knn":
            return {"code": TRAIN_CODE_VERSION, "train": {k: train[k] for k in KNN_SETTINGS}}
        if keyed:
            train = {k: v for k, v in train.items() if ADDED_TRAIN_SETTINGS.get(k, _UNSET) != v}
        return {"code": TRAIN_CODE_VERSION, "labels": self.data.labels, "train": train}

    def evaluate_settings(self) -> dict[str, Any]:
        return {"code": EVALUATE_CODE_VERSION, "evaluate": dataclasses.asdict(self.evaluate)}

    def extract_key(self) -> str:
        return settings_hash(self.extract_settings())

    def train_key(self) -> str:
        return settings_hash({"extract": self.extract_key(), **self.train_settings()})

    def evaluate_key(self) -> str:
        return settings_hash({"train": self.train_key(), **self.evaluate_settings()})


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


def settings_hash(settings: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able settings tree."""
    blob = json.dumps(settings, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def diff_settings(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable list of settings that differ, e.g. ``features.backbone: a -> b``."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_settings(a, b, name + ".")
        elif _norm(a) != _norm(b):
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def training_changes(old: Config, new: Config) -> list[str]:
    """What differs between the settings a run was trained with and the current
    ones, as ``diff_settings`` lines (extraction and training settings)."""
    return diff_settings(old.extract_settings() | old.train_settings(keyed=False),
                         new.extract_settings() | new.train_settings(keyed=False))


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


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
                        if k == "profile" or _norm(base[k]) != _norm(v)}
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


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a file that exists is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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

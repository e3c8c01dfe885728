"""The typed settings: one frozen dataclass per section, and their cache keys.

Each stage hashes exactly the sections it depends on (``extract_key``,
``train_key``, ``evaluate_key``) so that a training-only change never
invalidates extracted features, while a backbone change does. Reading and
writing TOML, profiles and ``--set`` live in ``pipeline.config``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from core.errors import CladError

# Bump when the extraction code changes what it writes for the same settings.
EXTRACT_CODE_VERSION = 1
TRAIN_CODE_VERSION = 1  # pre-registry runs; see stages/heads/legacy.py
RUN_CODE_VERSION = 2  # keys of runs trained through the head registry
EVALUATE_CODE_VERSION = 1

MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")


def check_range(section: str, checks: list[tuple[str, Any, bool, str]]) -> None:
    """Refuse the first setting whose check failed: ``(name, value, ok, allowed)``.

    Run when a section is built (config.toml, ``--set``), so a bad value is one
    line naming the setting, never a traceback later, a cache keyed on it, or a
    remembered ``--set``.
    """
    for name, value, ok, allowed in checks:
        if not ok:
            raise CladError(f"{section}.{name} = {value!r}: must be {allowed}; fix config.toml or --set")


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

    def __post_init__(self) -> None:
        check_range("data", [("labels", self.labels, self.labels in ("classes", "pseudo"), "classes or pseudo"),
                             ("layout", self.layout, self.layout in ("auto", "mvtec", "visa", "folder"),
                              "auto, mvtec, visa or folder")])


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

    @property
    def output_size(self) -> int:
        """Side of the network input and of every anomaly map: the crop, or the resize
        where there is no crop (the deploy runtime's ``clad_run.preprocess.output_size``)."""
        return self.crop if self.crop else self.resize

    def __post_init__(self) -> None:
        check_range("features", [
            ("layers", list(self.layers), len(self.layers) > 0 and min(self.layers) >= 0, "non-empty, >= 0"),
            ("resize", self.resize, self.resize >= 32, ">= 32"),
            ("crop", self.crop, self.crop == 0 or 32 <= self.crop <= self.resize, "0 (no crop) or 32 .. resize"),
            ("patch", self.patch, self.patch >= 1 and self.patch % 2 == 1, "an odd number >= 1"),
            ("pretrain_dim", self.pretrain_dim, self.pretrain_dim >= 1, ">= 1"),
            ("embed_dim", self.embed_dim, self.embed_dim >= 1, ">= 1"),
            ("shard_images", self.shard_images, self.shard_images >= 1, ">= 1"),
            ("batch_images", self.batch_images, self.batch_images >= 1, ">= 1"),
            ("compressor", self.compressor, self.compressor in ("lz4", "zstd", "none"), "lz4, zstd or none"),
            ("clevel", self.clevel, 0 <= self.clevel <= 22, "0 .. 22")])


@dataclass(frozen=True)
class SynthesisConfig:
    """GLASS-style local anomaly synthesis (docs/METHOD.md section 1)."""

    variants: int = 2  # synthetic images per normal training image
    beta_mean: float = 0.5
    beta_std: float = 0.1
    beta_min: float = 0.2
    beta_max: float = 0.8
    perlin_max_scale: int = 5  # resolution 2^k, k in 0..max
    perlin_threshold: float = 0.5
    max_tries: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("synthesis", [
            ("variants", self.variants, self.variants >= 0, ">= 0"),
            ("beta_std", self.beta_std, self.beta_std >= 0, ">= 0"),
            ("beta_min", self.beta_min, 0 <= self.beta_min <= self.beta_max <= 1, "0 <= beta_min <= beta_max <= 1"),
            ("beta_max", self.beta_max, 0 <= self.beta_max <= 1, "in [0, 1]"),
            ("perlin_max_scale", self.perlin_max_scale, 0 <= self.perlin_max_scale <= 8, "0 .. 8"),
            ("perlin_threshold", self.perlin_threshold, 0 < self.perlin_threshold < 1, "in (0, 1)"),
            ("max_tries", self.max_tries, self.max_tries >= 1, ">= 1"),
            ("seed", self.seed, self.seed >= 0, ">= 0")])


@dataclass(frozen=True)
class HeadSpec:
    """What the configuration needs to know of a registered head (filled by
    ``stages.heads.register_head``): its settings dataclass, the settings'
    values per profile, and settings added after runs existed with the value
    that reproduces the older behaviour (hashed only when set otherwise)."""

    name: str
    settings: type
    profiles: dict[str, dict[str, Any]]
    added: dict[str, Any]

    def defaults(self, profile: str) -> Any:
        """The head's settings under a profile (a profile it does not name = the defaults)."""
        return dataclasses.replace(self.settings(), **self.profiles.get(profile, {}))


HEADS: dict[str, HeadSpec] = {}  # head name -> spec, in registration order
PROFILE_NAMES = ("fast", "long", "paper")


@dataclass(frozen=True)
class TrainConfig:
    """Run-level training settings shared by every head.

    Each head's own settings (its dataclass, declared in its module) are in
    ``heads``; a head missing there has its defaults under ``profile``.
    """

    profile: str = "paper"
    head: str = "routed_knn"  # the recommended head (docs/RESULTS.md)
    holdout: float = 0.05  # fraction of each class's training images never trained on
    pseudo_k: int = 0  # labels = pseudo: k-means clusters; 0 = 2 x number of class folders
    seed: int = 0
    heads: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        check_range("train", [
            ("holdout", self.holdout, 0 <= self.holdout < 1, "in [0, 1)"),
            ("pseudo_k", self.pseudo_k, self.pseudo_k >= 0, ">= 0 (0 = 2 x classes)"),
            ("seed", self.seed, self.seed >= 0, ">= 0")])

    def head_settings(self, name: str = "") -> Any:
        """Settings of head ``name`` (default: the selected head)."""
        name = name or self.head
        if name in self.heads:
            return self.heads[name]
        if name not in HEADS:
            raise KeyError(name)
        return HEADS[name].defaults(self.profile)

    def all_heads(self) -> dict[str, Any]:
        """Every registered head's settings (filled with defaults where missing)."""
        return {name: self.head_settings(name) for name in HEADS}


@dataclass(frozen=True)
class CalibrateConfig:
    """Per-class verdict thresholds from training normals (``clad calibrate``)."""

    quantile: float = 0.99  # of unseen normal training images' scores, per class
    min_images: int = 8  # fewer unseen normals than this: widen the threshold (see stages/calibrate.py)
    folds: int = 5  # cross-fitting folds for heads that can refit cheaply
    normalized_at: float = 0.5  # the normalised score of a class's threshold
    route_quantile: float = 0.99  # out-of-distribution: farther from every class than this quantile
    overrides: str = ""  # optional TOML file of per-class thresholds set by the user

    def __post_init__(self) -> None:
        check_range("calibrate", [
            ("quantile", self.quantile, 0 < self.quantile <= 1, "in (0, 1]"),
            ("min_images", self.min_images, self.min_images >= 1, ">= 1"),
            ("folds", self.folds, self.folds >= 1, ">= 1"),
            ("normalized_at", self.normalized_at, 0 < self.normalized_at < 1, "in (0, 1)"),
            ("route_quantile", self.route_quantile, 0 < self.route_quantile <= 1, "in (0, 1]")])


@dataclass(frozen=True)
class EvaluateConfig:
    """Anomaly maps and metrics."""

    sigma: float = 4.0
    aupro_fpr: float = 0.3
    figures_per_class: int = 3

    def __post_init__(self) -> None:
        check_range("evaluate", [
            ("sigma", self.sigma, self.sigma >= 0, ">= 0"),
            ("aupro_fpr", self.aupro_fpr, 0 < self.aupro_fpr <= 1, "in (0, 1]"),
            ("figures_per_class", self.figures_per_class, self.figures_per_class >= 0, ">= 0")])


@dataclass(frozen=True)
class Config:
    """The whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)

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

    def evaluate_settings(self) -> dict[str, Any]:
        return {"code": EVALUATE_CODE_VERSION, "evaluate": dataclasses.asdict(self.evaluate)}

    def extract_key(self) -> str:
        return settings_hash(self.extract_settings())

    def evaluate_key(self, train_key: str) -> str:
        """Key of an evaluation of the run whose training key is ``train_key``."""
        return settings_hash({"train": train_key, **self.evaluate_settings()})


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
        elif norm_value(a) != norm_value(b):
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def norm_value(v: Any) -> Any:
    """Tuples compare equal to lists (TOML gives lists)."""
    return list(v) if isinstance(v, tuple) else v



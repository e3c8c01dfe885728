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


def training_changes(old: Config, new: Config) -> list[str]:
    """What differs between the settings a run was trained with and the current
    ones, as ``diff_settings`` lines (extraction and training settings)."""
    return diff_settings(old.extract_settings() | old.train_settings(keyed=False),
                         new.extract_settings() | new.train_settings(keyed=False))


def norm_value(v: Any) -> Any:
    """Tuples compare equal to lists (TOML gives lists)."""
    return list(v) if isinstance(v, tuple) else v



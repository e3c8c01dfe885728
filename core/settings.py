"""The typed settings: one frozen dataclass per section, and their cache keys.

Every setting is declared once, with ``core.schema.setting`` (type,
default, allowed values, help, the value of runs made before it existed);
every construction checks every field against it. Each stage hashes exactly
the sections it depends on (``extract_key``, ``train_key``,
``evaluate_key``) so that a training-only change never invalidates extracted
features, while a backbone change does; a setting at its ``added`` value is
left out of the hash, so adding one keeps existing keys. Reading and writing
TOML, profiles and ``--set`` live in ``pipeline.config``; each head's
settings and the head table live with the head registry
(``stages.heads.registry``), reached through ``head_table``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from core.schema import Settings, keyed, setting

# Bump when the extraction code changes what it writes for the same settings.
EXTRACT_CODE_VERSION = 1
TRAIN_CODE_VERSION = 1  # pre-registry runs; see stages/heads/legacy.py
RUN_CODE_VERSION = 2  # keys of runs trained through the head registry
EVALUATE_CODE_VERSION = 1

MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")


HEAD_REGISTRY = "stages.heads.registry"  # owns the head table; imported by name (see head_table)


def head_table() -> dict[str, Any]:
    """The registered heads: name -> ``stages.heads.registry.HeadSpec``, in registration order.

    The table lives with the head registry (``stages.heads.registry.HEADS``).
    core sits below stages and never imports it statically; the first lookup
    imports the registry by name, which imports ``stages.heads`` and so
    registers every head. A ``Config`` built without anything having imported
    the heads therefore still finds them.
    """
    return importlib.import_module(HEAD_REGISTRY).HEADS


def registered_heads() -> tuple[str, ...]:
    """The words ``train.head`` takes."""
    return tuple(head_table())


@dataclass(frozen=True)
class DataConfig(Settings):
    """Where the images are and how classes are labelled."""

    root: str = setting("", help="the data set's folder")
    textures: str = setting("", help='folder of texture images (DTD); "" = built-in procedural source')
    layout: str = setting("auto", choices=("auto", "mvtec", "visa", "folder"),
                          help="how the folder is organised (stages/extract/data.py); auto = detected")
    classes: tuple[str, ...] = setting((), help="empty = every class found")
    texture_classes: tuple[str, ...] = setting(MVTEC_TEXTURES + ("weave", "grain", "speckle"),
                                               help="texture classes: the whole image is foreground (no object mask)")
    fg_masks: str = setting("", help="optional folder <fg>/<class>/<file>: user masks win")
    labels: str = setting("classes", choices=("classes", "pseudo"),
                          help="classes: the class folders | pseudo: k-means clusters (training only)")


@dataclass(frozen=True)
class FeatureConfig(Settings):
    """Backbone and patch-feature settings (extraction)."""

    backbone: str = setting("tf_efficientnet_lite0", help="timm model name")
    weights: str = setting("package", help="package | hub-cache | path/to/state_dict.pth")
    layers: tuple[int, ...] = setting((2, 3), low=0, nonempty=True, help="backbone stages whose features are used")
    resize: int = setting(256, low=32, help="image side before the crop")
    crop: int = setting(224, check=lambda crop, f: crop == 0 or 32 <= crop <= f.resize,
                        allowed="0 (no crop) or 32 .. resize", help="0 = no crop (keeps defects at the border)")
    patch: int = setting(3, low=1, odd=True, help="local aggregation neighbourhood p x p")
    pretrain_dim: int = setting(360, low=1)
    embed_dim: int = setting(360, low=1, help="C_d; <= min(C_j * p^2) so pooling never duplicates values")
    shard_images: int = setting(16, low=1, help="images per cache shard")
    batch_images: int = setting(8, low=1, help="images per backbone batch")
    compressor: str = setting("lz4", choices=("lz4", "zstd", "none"), help="cache compression")
    clevel: int = setting(5, low=0, high=22, help="compression level")

    @property
    def output_size(self) -> int:
        """Side of the network input and of every anomaly map: the crop, or the resize
        where there is no crop (the deploy runtime's ``clad_run.preprocess.output_size``)."""
        return self.crop if self.crop else self.resize


@dataclass(frozen=True)
class SynthesisConfig(Settings):
    """GLASS-style local anomaly synthesis (docs/METHOD.md section 1)."""

    variants: int = setting(2, low=0, help="synthetic images per normal training image")
    beta_mean: float = setting(0.5)
    beta_std: float = setting(0.1, low=0)
    beta_min: float = setting(0.2, low=0, check=lambda v, s: v <= s.beta_max, allowed="<= beta_max")
    beta_max: float = setting(0.8, low=0, high=1)
    perlin_max_scale: int = setting(5, low=0, high=8, help="resolution 2^k, k in 0..max")
    perlin_threshold: float = setting(0.5, above=0, below=1)
    max_tries: int = setting(50, low=1)
    seed: int = setting(0, low=0)


PROFILE_NAMES = ("fast", "long", "paper")


@dataclass(frozen=True)
class TrainConfig(Settings):
    """Run-level training settings shared by every head.

    Each head's own settings (its dataclass, declared in its module) are in
    ``heads``; a head missing there has its defaults under ``profile``.
    """

    profile: str = setting("paper", choices=PROFILE_NAMES, help="every head's schedule")
    head: str = setting("routed_knn", choices=registered_heads, help="the recommended head (docs/RESULTS.md)")
    holdout: float = setting(0.05, low=0, below=1, help="fraction of each class's training images never trained on")
    pseudo_k: int = setting(0, low=0, help="labels = pseudo: k-means clusters; 0 = 2 x number of class folders")
    seed: int = setting(0, low=0)
    heads: dict[str, Any] = field(default_factory=dict, compare=False)

    def head_settings(self, name: str = "") -> Any:
        """Settings of head ``name`` (default: the selected head)."""
        name = name or self.head
        if name in self.heads:
            return self.heads[name]
        heads = head_table()
        if name not in heads:
            raise KeyError(name)
        return heads[name].defaults(self.profile)

    def all_heads(self) -> dict[str, Any]:
        """Every registered head's settings (filled with defaults where missing)."""
        return {name: self.head_settings(name) for name in head_table()}


@dataclass(frozen=True)
class CalibrateConfig(Settings):
    """Per-class verdict thresholds from training normals (``clad calibrate``)."""

    quantile: float = setting(0.99, above=0, high=1, help="of unseen normal training images' scores, per class")
    min_images: int = setting(8, low=1, help="fewer unseen normals than this: widen the threshold "
                                           "(see stages/train/calibrate.py)")
    folds: int = setting(5, low=1, help="cross-fitting folds for heads that can refit cheaply")
    normalized_at: float = setting(0.5, above=0, below=1, help="the normalised score of a class's threshold")
    route_quantile: float = setting(0.99, above=0, high=1,
                                    help="out-of-distribution: farther from every class than this quantile")
    overrides: str = setting("", help="optional TOML file of per-class thresholds set by the user")
    seen_shift: str = setting("gap_spread", choices=("gap_spread", "gap", "none"), added="none",
                              help="gap_spread: scores of images a learned head trained on are moved onto its "
                                   "held-out images' scores, location and spread (stages/train/calibrate.py "
                                   "seen_fit) | gap: location only | none; cross-fitted heads (knn) have no "
                                   "seen images")
    seen_own_floor: bool = setting(True, added=False,
                                   help="a class with too few held-out images for its own seen-to-unseen fit takes "
                                        "the pooled one, but is shifted at least as far as its own held-out "
                                        "images' median (stages/train/calibrate.py seen_fit)")


@dataclass(frozen=True)
class EvaluateConfig(Settings):
    """Anomaly maps and metrics."""

    sigma: float = setting(4.0, low=0, help="Gaussian smoothing of anomaly maps, in pixels")
    aupro_fpr: float = setting(0.3, above=0, high=1, help="AUPRO's false-positive-rate limit")
    figures_per_class: int = setting(3, low=0)


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
        data = keyed(self.data)
        data.pop("labels")
        return {
            "code": EXTRACT_CODE_VERSION,
            "data": data,
            "features": keyed(self.features),
            "synthesis": keyed(self.synthesis),
        }

    def evaluate_settings(self) -> dict[str, Any]:
        return {"code": EVALUATE_CODE_VERSION, "evaluate": keyed(self.evaluate)}

    def extract_key(self) -> str:
        return settings_hash(self.extract_settings())

    def evaluate_key(self, train_key: str) -> str:
        """Key of an evaluation of the run whose training key is ``train_key``."""
        return settings_hash({"train": train_key, **self.evaluate_settings()})


for _section in fields(Config):  # each section's table in config.toml is its name here
    _section.default_factory.table = _section.name


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



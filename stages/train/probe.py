"""The held-out structural probe: every head's validation without test labels.

The training synthesis (LAS textures, GAS perturbations) cannot judge a head
that learned it: held-out LAS rows ranked CLAD runs backwards (docs/RESULTS.md).
The probe makes anomalies of a kind no head trains on: CutPaste and
CutPaste-Scar (a piece of the same image moved onto its foreground;
``stages.extract.synthesis.cut_paste``) on the run's held-out training images, which
are themselves the probe's normal images; a class with few held-out images gets
more versions of each (``versions_per_image``). Its features belong to stage 1:
``clad extract`` encodes them for config.toml's held-out split
(``extract_probe``) and keeps them beside the cache
(``WORK/cache/probe/<key>.pt``), so training only reads them; a run with
another split (``--set holdout=...`` or ``seed``) encodes its own on first
use, once, with the extraction backbone. A head scores the probe exactly as ``clad
evaluate`` scores the test set (maps, image score = max, pixel metrics);
``probe_pixel`` (mean of pixel AUROC and AUPRO) is the selector: on the
heads table the probe's pixel metrics ranked runs as the test set did
(Spearman rho = 1 on the built-in and six-class models), its image AUROC did
not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cache.stream import TrainCache
from core.errors import CladError
from core.files import save_torch_atomic
from core.settings import Config, settings_hash
from stages.maps import anomaly_maps, image_scores
from stages.metrics import aupro, auroc

VARIANTS = 2  # CutPaste and CutPaste-Scar versions per held-out image, each, at least
# CutPaste/Scar images per class at least, whatever the heads read (probe_size): 2 x VARIANTS, so no class gets
# more versions unless a head asks for them (CLAD's score_mix_anomalies; docs/RESULTS.md, rounds 12-13)
MIN_ANOMALIES = 2 * VARIANTS
PROBE_VERSION = 1  # bump when the probe's images change
ScoreMaps = Callable[[torch.Tensor], torch.Tensor]  # [n, H*W, C] -> [n, H*W]


class ProbeSize(NamedTuple):
    """How large a probe a head reads: CutPaste/Scar images per class, and versions of each
    held-out image, at least (``versions_per_image``)."""

    anomalies: int = MIN_ANOMALIES
    versions: int = 2 * VARIANTS


DEFAULT_SIZE = ProbeSize()  # what every head but a probe-chosen CLAD score mix reads


def defective(masks: np.ndarray) -> np.ndarray:
    """``[n, S, S]`` masks -> ``[n]`` bool: the images with a defect pixel (the probe's anomalies)."""
    return masks.reshape(len(masks), -1).max(1) > 0


@dataclass
class ProbeSet:
    """Per class: ``features`` ``[n, H*W, C]`` float16 (held-out normal images
    and their synthetic versions) and ``masks`` ``[n, S, S]`` uint8."""

    features: dict[str, np.ndarray]
    masks: dict[str, np.ndarray]
    examples: dict[str, np.ndarray] | None = None  # per class [3, S, S, 3]: normal, CutPaste, Scar (pictures)

    def image_counts(self) -> dict[str, list[int]]:
        """Per class [normal, anomalous] probe images (``probe_images`` in train.json)."""
        out = {}
        for name, m in self.masks.items():
            anomalous = int(defective(m).sum())
            out[name] = [len(m) - anomalous, anomalous]
        return out

    def first_versions(self, versions: int = 2 * VARIANTS) -> ProbeSet:
        """Each held-out image with only its first ``versions`` CutPaste/Scar versions: the probe the
        epochs are selected on (scored every epoch, so kept at its old size; the first versions are
        the same whatever a class's count, ``build_probe``). The score mix, chosen once, reads all."""
        keep: dict[str, np.ndarray] = {}
        for name, m in self.masks.items():
            starts = np.flatnonzero(~defective(m))  # each held-out image starts its block
            ends = np.minimum(np.append(starts[1:], len(m)), starts + versions + 1)
            keep[name] = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends, strict=True)])
        if all(len(i) == len(self.masks[k]) for k, i in keep.items()):
            return self  # nothing beyond the first versions (the default probe): no copy of its features
        return ProbeSet({k: self.features[k][i] for k, i in keep.items()},
                        {k: self.masks[k][i] for k, i in keep.items()})


def versions_per_image(held: int, variants: int = VARIANTS, min_anomalies: int = MIN_ANOMALIES,
                       min_versions: int = 0) -> int:
    """CutPaste/Scar versions of each of a class's ``held`` held-out images: ``2 x variants``, or
    more where the class would otherwise hold fewer than ``min_anomalies``, or fewer than
    ``min_versions`` of each image (an even number: as many CutPaste as Scar versions).

    Why: one held-out image with 4 versions (each built-in class: 5 % of its 20-30 training
    images) makes a probe whose choices are a coin toss. On the seven-class model, four independent
    draws of those 4 versions split 2-2 between two score mixes for the small classes; with
    16 or 32 versions each the draws agree more (docs/RESULTS.md, round 12). A class with ten
    held-out images and 4 versions of each chose three different mixes in four draws; with 16
    versions of each, one (round 12), hence ``min_versions`` (round 14)."""
    if held <= 0:
        return 0
    need = max(-(-min_anomalies // held), min_versions)  # ceil
    return max(2 * variants, need + need % 2)


def probe_size(cfg: Config) -> ProbeSize:
    """Probe anomalies per class and versions per held-out image, at least: what the configured
    head (``cfg.train.head``) reads with its settings (``Head.probe_size``), and the default
    probe's (``MIN_ANOMALIES``, ``2 x VARIANTS``). The first versions of
    each image, which every other head and every epoch selection read, are the same whatever the
    size; a head that reads more builds its own probe on first use where the configured one does
    not (the key holds the size), so a workspace that trains only the default head never encodes
    CLAD's larger probe."""
    from stages.heads import head_class

    wants = head_class(cfg.train.head).probe_size(cfg.train.head_settings())
    return ProbeSize(max(MIN_ANOMALIES, wants.anomalies), max(2 * VARIANTS, wants.versions))


def probe_key(cache_key: str, held_ids: list[str], seed: int, size: ProbeSize = DEFAULT_SIZE) -> str:
    """The probe's file name: the cache (backbone, sizes), the held-out images, the seed of
    their synthetic versions and how many a class and an image hold (versions only where
    above the default, so the probes made before that setting keep their names)."""
    fields = {"cache": cache_key, "held": held_ids, "seed": seed, "variants": VARIANTS,
              "min_anomalies": size.anomalies, "version": PROBE_VERSION}
    if size.versions > 2 * VARIANTS:
        fields["min_versions"] = size.versions
    return settings_hash(fields)


def probe_path(cfg: Config, cache: TrainCache, held: np.ndarray, cache_key: str) -> Path:
    """``WORK/cache/probe/<probe_key>.pt`` of this held-out split, at the configured head's size."""
    ids = [str(cache.image_ids[i]) for i in np.nonzero(held)[0]]
    key = probe_key(cache_key, ids, cfg.train.seed, probe_size(cfg))
    return Path(cache.store.path).parent / "probe" / f"{key}.pt"


def class_versions(cache: TrainCache, held: np.ndarray, variants: int = VARIANTS, min_anomalies: int = MIN_ANOMALIES,
                   min_versions: int = 0) -> np.ndarray:
    """``[n_classes]`` int: CutPaste/Scar versions of each held-out image of each class
    (``versions_per_image`` of its held-out count; 0 for a class with none)."""
    per_class = np.bincount(cache.image_class[held], minlength=len(cache.class_names))
    return np.array([versions_per_image(int(n), variants, min_anomalies, min_versions) for n in per_class], int)


def build_probe(cfg: Config, cache: TrainCache, held: np.ndarray, device: torch.device,
                variants: int = VARIANTS, min_anomalies: int = MIN_ANOMALIES, min_versions: int = 0) -> ProbeSet:
    """Encode the held-out images and ``versions_per_image`` CutPaste/Scar versions of each
    (alternating, CutPaste first; the first ``2 x variants`` are the same whatever the class's count)."""
    from core.files import seeded
    from stages.extract.data import load_image
    from stages.extract.features import FeatureEncoder
    from stages.extract.synthesis import cut_paste, foreground_mask

    paths = [p for s in range(cache.n_shards) for p in cache.store.open_shard(s).attrs["paths"]]
    encoder = FeatureEncoder(cfg.features, device)
    feats: dict[str, list[np.ndarray]] = {}
    masks: dict[str, list[np.ndarray]] = {}
    examples: dict[str, np.ndarray] = {}
    versions = class_versions(cache, held, variants, min_anomalies, min_versions)
    for i in np.nonzero(held)[0]:
        name = cache.class_names[int(cache.image_class[i])]
        image = load_image(paths[i], cfg.features)
        fg = foreground_mask(image, name in cfg.data.texture_classes)
        images, ms = [image], [np.zeros(image.shape[:2], np.uint8)]
        for v in range(int(versions[cache.image_class[i]])):
            x, m = cut_paste(image, fg, seeded(cfg.train.seed, "cutpaste", cache.image_ids[i], v), scar=v % 2 == 1)
            images.append(x)
            ms.append(m.astype(np.uint8))
        feats.setdefault(name, []).append(encoder(np.stack(images)).astype(np.float16))
        masks.setdefault(name, []).extend(ms)
        examples.setdefault(name, np.stack(images[:3]))
    return ProbeSet({k: np.concatenate(v) for k, v in feats.items()}, {k: np.stack(v) for k, v in masks.items()},
                    examples)


def load_or_build_probe(cfg: Config, cache: TrainCache, held: np.ndarray, cache_key: str, device: torch.device,
                        log: Callable[[str], None]) -> ProbeSet | None:
    """The probe of this held-out split, from ``WORK/cache/probe/`` or built
    (and written atomically) on first use; None without held-out images."""
    if not held.any():
        return None
    size = probe_size(cfg)
    path = probe_path(cfg, cache, held, cache_key)
    if path.is_file():
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            return ProbeSet({k: v.numpy() for k, v in d["features"].items()},
                            {k: v.numpy() for k, v in d["masks"].items()})
        except Exception:  # noqa: BLE001 - a damaged file is rebuilt
            log(f"probe: {path} unreadable; building it again")
    counts = sorted({int(v) for v in class_versions(cache, held, min_anomalies=size.anomalies,
                                                     min_versions=size.versions) if v > 0})
    log(f"probe: encoding {int(held.sum())} held-out images and {counts[0]}{f'-{counts[-1]}' * (len(counts) > 1)} "
        f"CutPaste/Scar versions of each into {path.parent}")
    try:
        probe = build_probe(cfg, cache, held, device, min_anomalies=size.anomalies, min_versions=size.versions)
    except (OSError, CladError) as exc:  # the images moved since extraction: train on, unvalidated
        log(f"probe: {exc}; training without the probe (each phase keeps its last epoch)")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch_atomic({"features": {k: torch.from_numpy(v) for k, v in probe.features.items()},
                       "masks": {k: torch.from_numpy(v) for k, v in probe.masks.items()}}, path)
    return probe


def class_probe_metrics(scores: torch.Tensor, masks: np.ndarray, size: int, sigma: float,
                        fpr_limit: float) -> dict[str, float]:
    """One class's probe metrics from its patch scores ``[n, H*W]`` and masks
    ``[n, S, S]`` (an image is anomalous where its mask has a pixel): image
    AUROC, pixel AUROC, AUPRO and ``pixel`` (the mean of the two pixel metrics).

    Only these, as ``stages.metrics.class_metrics`` computes them: the probe is scored every
    epoch and for every score-mix candidate, and the evaluation's other metrics (pixel AP, the
    ADer AUPRO, F1) would sort every pixel again for numbers nothing reads."""
    maps = anomaly_maps(scores, size, sigma)
    labels = defective(masks).astype(int)
    m = {"image_auroc": auroc(labels, image_scores(maps)), "pixel_auroc": auroc(masks, maps),
         "aupro": aupro(maps, masks, fpr_limit)}
    return {**m, "pixel": (m["pixel_auroc"] + m["aupro"]) / 2}


def probe_metrics(probe: ProbeSet | None, score_maps: ScoreMaps, size: int, sigma: float,
                  fpr_limit: float) -> dict[str, float]:
    """Mean over classes of the probe's image AUROC, pixel AUROC and AUPRO for
    one scoring function, and ``probe_pixel`` = mean of the two pixel
    metrics (NaN everywhere without a probe)."""
    keys = ("image_auroc", "pixel_auroc", "aupro")
    if probe is None:
        return {f"probe_{k}": float("nan") for k in (*keys, "pixel")}
    per_class = []
    for name, x in probe.features.items():
        with torch.no_grad():
            s = score_maps(torch.from_numpy(x.astype(np.float32)))
        per_class.append(class_probe_metrics(s, probe.masks[name], size, sigma, fpr_limit))
    out = {f"probe_{k}": float(np.mean([c[k] for c in per_class])) for k in keys}
    out["probe_pixel"] = (out["probe_pixel_auroc"] + out["probe_aupro"]) / 2
    return out


def extract_probe(cfg: Config, cache_dir: Path, device: torch.device, log: Callable[[str], None]) -> Path | None:
    """Stage 1's part of the probe: the probe of config.toml's held-out split
    (``train.holdout``, ``train.seed``) for the train cache in ``cache_dir``, encoded
    unless it is there already; its path (None without held-out images)."""
    from cache.store import FeatureStore
    from stages.train.labels import holdout_images

    store = FeatureStore(cache_dir / "train.zarr")
    cache = TrainCache(store)
    held = holdout_images(cache, cfg.train.holdout, cfg.train.seed)
    if load_or_build_probe(cfg, cache, held, store.info().key, device, log) is None:
        return None
    return probe_path(cfg, cache, held, store.info().key)

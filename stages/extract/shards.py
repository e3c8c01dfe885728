"""Computing one shard: decode (and synthesize), backbone, patch rows, write.

Train shards hold, per image, all normal patch rows followed by the anomaly
rows of its synthesized variants (only patches inside the fused Perlin
region; each with the row of its same-place normal patch). Test shards hold
one whole feature map per image with its class, label and mask. A shard is
committed on its own (``cache.store``), so it always holds the same bytes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache.store import FeatureStore, compressors
from core.errors import CladError
from core.files import seeded
from core.settings import Config
from stages.extract.data import Sample, load_image, load_mask
from stages.extract.features import FeatureEncoder
from stages.extract.plan import ShardTask
from stages.extract.synthesis import TextureSource, foreground_mask, synthesize


@dataclass
class Timings:
    """Seconds spent per part of extraction (for the benchmark)."""

    decode: float = 0.0
    synthesis: float = 0.0
    forward: float = 0.0
    aggregate: float = 0.0
    write: float = 0.0
    images: int = 0
    rows: int = 0

    def add(self, other: Timings) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class Prepared:
    """Decoded (and synthesized) images of one shard, ready for the backbone."""

    task: ShardTask
    images: np.ndarray  # [M, S, S, 3] float32: train: per sample 1 + K images
    patch_masks: list[np.ndarray] = field(default_factory=list)  # train: per synthetic image
    betas: list[float] = field(default_factory=list)
    masks: np.ndarray | None = None  # test: [n, S, S] uint8
    timings: Timings = field(default_factory=Timings)

    @property
    def split(self) -> str:
        return self.task.split

    @property
    def shard(self) -> int:
        return self.task.shard

    @property
    def samples(self) -> list[Sample]:
        return self.task.samples


class ShardExtractor:
    """Everything needed to turn a shard of images into arrays (one per process)."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.encoder = FeatureEncoder(cfg.features, device)
        self.stride = self.encoder.stride
        self.textures = TextureSource(cfg.data.textures)
        if cfg.data.textures and not self.textures.files:
            raise CladError(f"data.textures={cfg.data.textures!r}: no images found; point it at a "
                            "folder of texture images (e.g. DTD) or leave it empty for built-in textures")
        self.texture_classes = set(cfg.data.texture_classes)

    def _foreground(self, s: Sample, image: np.ndarray) -> np.ndarray:
        if self.cfg.data.fg_masks:
            p = Path(self.cfg.data.fg_masks) / s.class_name / Path(s.path).name
            if p.is_file():
                return load_mask(str(p), self.cfg.features).astype(np.float32)
        return foreground_mask(image, s.class_name in self.texture_classes)

    def prepare(self, task: ShardTask) -> Prepared:
        """Decode (and for train, synthesize); pure CPU, safe in a helper thread."""
        t = Timings()
        split = task.split
        images, pmasks, betas, masks = [], [], [], []
        for s in task.samples:
            t0 = time.perf_counter()
            img = load_image(s.path, self.cfg.features)
            if split == "test":
                masks.append(load_mask(s.mask_path, self.cfg.features))
            t.decode += time.perf_counter() - t0
            images.append(img)
            if split == "train":
                t0 = time.perf_counter()
                fg = self._foreground(s, img)
                for v in range(self.cfg.synthesis.variants):
                    syn = synthesize(img, fg, self.textures, self.cfg.synthesis, self.stride,
                                     seeded(self.cfg.synthesis.seed, s.image_id, v))
                    images.append(syn.image)
                    pmasks.append(syn.patch_mask)
                    betas.append(syn.beta)
                t.synthesis += time.perf_counter() - t0
        t.images = len(task.samples)
        return Prepared(task, np.stack(images), pmasks, betas,
                        np.stack(masks) if masks else None, t)

    def compute(self, prep: Prepared) -> dict[str, np.ndarray]:
        return self.finish(prep, self.encoder.levels(prep.images, prep.timings))

    def finish(self, prep: Prepared, levels: list[list[torch.Tensor]]) -> dict[str, np.ndarray]:
        """Project backbone outputs to patch rows and lay out the shard's arrays."""
        feats = self.encoder.project(levels, prep.timings)
        arrays = (self._train_arrays(prep, feats) if prep.split == "train"
                  else self._test_arrays(prep, feats))
        prep.timings.rows = int(arrays["features"].shape[0] * (1 if prep.split == "train"
                                                               else arrays["features"].shape[1]))
        return arrays

    def _train_arrays(self, prep: Prepared, feats: np.ndarray) -> dict[str, np.ndarray]:
        k = self.cfg.synthesis.variants
        hw = feats.shape[1]
        side = int(round(hw ** 0.5))
        yx_all = np.stack(np.divmod(np.arange(hw), side), axis=1).astype(np.int16)
        parts: dict[str, list[np.ndarray]] = {n: [] for n in
                                              ("features", "class_id", "anomaly", "image", "yx", "pair", "beta")}
        row = 0
        for i, s in enumerate(prep.samples):
            cid = _class_id(prep.task, s)
            normal_start = row
            blocks = [(feats[i * (k + 1)], np.ones(hw, bool), -1, 1.0)]
            for v in range(k):
                pm = prep.patch_masks[i * k + v].reshape(-1)
                if pm.size != hw:  # a bug, not bad input: the labels would land on other patches
                    raise RuntimeError(f"patch mask of {prep.patch_masks[i * k + v].shape} cells for "
                                       f"{hw} feature rows ({self.cfg.features.backbone}, stride {self.stride})")
                blocks.append((feats[i * (k + 1) + 1 + v], pm, 1, prep.betas[i * k + v]))
            for rows, keep, is_anom, beta in blocks:
                idx = np.nonzero(keep)[0]
                n = len(idx)
                parts["features"].append(rows[idx])
                parts["class_id"].append(np.full(n, cid, np.int16))
                parts["anomaly"].append(np.full(n, is_anom > 0, np.uint8))
                parts["image"].append(np.full(n, prep.task.first_image + i, np.int32))
                parts["yx"].append(yx_all[idx])
                parts["pair"].append((normal_start + idx).astype(np.int32) if is_anom > 0
                                     else np.full(n, -1, np.int32))
                parts["beta"].append(np.full(n, beta, np.float16))
                row += n
        return {name: np.concatenate(v) for name, v in parts.items()}

    def _test_arrays(self, prep: Prepared, feats: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "features": feats,
            "class_id": np.array([_class_id(prep.task, s) for s in prep.samples], np.int16),
            "label": np.array([s.label for s in prep.samples], np.uint8),
            "mask": prep.masks,
        }

    def write(self, store: FeatureStore, prep: Prepared, arrays: dict[str, np.ndarray]) -> None:
        t0 = time.perf_counter()
        attrs = {"image_ids": [s.image_id for s in prep.samples],
                 "paths": [s.path for s in prep.samples],
                 "defects": [s.defect for s in prep.samples]}
        chunk_rows = {"features": 1, "mask": 1} if prep.split == "test" else None
        store.write_shard(prep.shard, arrays, attrs,
                          compressors(self.cfg.features.compressor, self.cfg.features.clevel), chunk_rows)
        prep.timings.write += time.perf_counter() - t0


def _class_id(task: ShardTask, s: Sample) -> int:
    return task.class_names.index(s.class_name)


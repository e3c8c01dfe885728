"""``clad export``: a trained run as a self-contained deploy bundle for ``clad-run``.

The bundle holds the feature extractor (backbone + local aggregation +
projection, ``stages.extract.features``) as one ONNX graph on preprocessed images,
the head's own part (``Head.export``: an ONNX graph or per-class arrays),
the routing descriptors, and ``manifest.json``: classes, preprocessing,
thresholds in force and their normalisation, map settings, the head's
scoring rule, versions, a sha256 of every file, and the parity of the
bundle against the torch path measured here on a golden set of images
(kept in the bundle, so ``clad-run --verify`` repeats it on the target).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import CladError
from core.files import swap_into_place, temp_dir, write_atomic
from core.layout import RunFiles
from core.settings import Config
from stages.extract.data import index_dataset, load_image
from stages.extract.features import FeatureEncoder
from stages.heads import load_trained_head
from stages.heads.base import ExportContext
from stages.heads.onnx_graph import write_onnx
from stages.maps import anomaly_maps, image_scores
from stages.train.calibrate import load_router, read_calibration, verdicts_in_force

GOLDEN_PER_KIND = 2  # golden images per class and kind (normal, defective)



class ExtractorGraph(torch.nn.Module):
    """``[n, 3, S, S]`` backbone-range images -> ``[n, H*W, C_d]`` patch features (``FeatureEncoder``)."""

    def __init__(self, encoder: FeatureEncoder):
        super().__init__()
        self.net, self.projector = encoder.backbone.net, encoder.projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector([f.float() for f in self.net(x)])


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CladError(f"--out {out}: is a file, not a folder; name a new folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise CladError(f"--out {out}: folder holds files that are not an earlier bundle (no manifest.json), and "
                        "export replaces its output folder whole; name a new or empty folder")


def golden_samples(cfg: Config, held_ids: set[str] = frozenset()) -> list[tuple[str, str, int]]:
    """(path, class, label) per class: a few normal and defective test images, or where a class
    has no test set its held-out training images (``held_ids``; others only if too few are held out:
    a knn bank's own image scores ~0 with torch, a few float16 roundings more with onnxruntime)."""
    samples = index_dataset(cfg.data, check_masks=False)
    out = []
    for c in sorted({s.class_name for s in samples}):
        test = [s for s in samples if s.class_name == c and s.split == "test"]
        if test:
            picked = [s for s in test if s.label == 0][:GOLDEN_PER_KIND] + \
                     [s for s in test if s.label == 1][:GOLDEN_PER_KIND]
        else:
            train = [s for s in samples if s.class_name == c]
            train.sort(key=lambda s: s.image_id not in held_ids)  # held-out first (a stable sort)
            picked = train[:GOLDEN_PER_KIND]
        out += [(s.path, c, s.label) for s in picked]
    return out


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import timm

    from core.settings import RUN_CODE_VERSION

    import clad_run

    return {"clad_code_version": str(RUN_CODE_VERSION), "clad_run_package": clad_run.__version__,
            "torch": torch.__version__, "timm": timm.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def export_run(cfg: Config, files: RunFiles, out: Path, train_image_class: np.ndarray,
               log: Callable[[str], None], held_ids: set[str] = frozenset()) -> dict[str, Any]:
    """Write the bundle of run ``files`` to ``out`` (built in a hidden sibling, swapped into place)."""
    check_out(out)
    work = temp_dir(out)
    try:
        manifest = _write_bundle(cfg, files, work, train_image_class, log, held_ids)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    swap_into_place(work, out)
    return manifest


def _write_bundle(cfg: Config, files: RunFiles, root: Path, train_image_class: np.ndarray,
                  log: Callable[[str], None], held_ids: set[str]) -> dict[str, Any]:
    from clad_run.bundle import FORMAT, FORMAT_VERSION, sha256

    cpu = torch.device("cpu")
    head, meta = load_trained_head(files.final, cpu)
    classes = list(meta["class_names"])
    verdicts = verdicts_in_force(read_calibration(files), files, cfg.calibrate)
    f = cfg.features
    size = f.output_size
    encoder = FeatureEncoder(f, cpu)
    log(f"export: feature extractor {f.backbone} (layers {list(f.layers)}) as ONNX at {size}x{size}")
    rel = "feature_extractor.onnx"
    info = write_onnx(ExtractorGraph(encoder), torch.zeros(2, 3, size, size), root / rel, "image", "features",
                      {0: "batch"})
    ctx = ExportContext(root, "head", classes, np.asarray(train_image_class))
    side = size // encoder.stride
    features = {**info, "file": rel, "backbone": f.backbone, "layers": list(f.layers), "patch": f.patch,
                "pretrain_dim": f.pretrain_dim, "embed_dim": f.embed_dim, "grid": [side, side],
                "batch": f.batch_images, "round_to": "float16"}
    log(f"export: head {meta['head']!r}")
    head_spec = head.export(ctx)
    routing = None
    router = load_router(files)
    if router is not None:
        routing = {"files": {"descriptors": _save(root, "routing/descriptors", router.desc),
                             "image_class": _save(root, "routing/image_class", router.cls)},
                   "quantile": router.quantile, "ood_factor": router.ood_factor,
                   "ood_limit": [None if not math.isfinite(v) else float(v) for v in router.ood_limit],
                   "confident": 0.5}
    golden = golden_samples(cfg, held_ids)
    images = np.stack([load_image(p, f) for p, _, _ in golden])
    log(f"export: golden set of {len(golden)} images through the torch path")
    feats = encoder(images).astype(np.float32)
    maps = anomaly_maps(head.score_maps(torch.from_numpy(feats)), size, cfg.evaluate.sigma)
    scores = image_scores(maps)
    golden_files = {"images": _save(root, "golden/images", np.round(images * 255).astype(np.uint8)),
                    "scores": _save(root, "golden/torch_scores", scores.astype(np.float32)),
                    "maps": _save(root, "golden/torch_maps", maps.astype(np.float32))}
    torch_verdicts = [verdicts.judge(c, float(s))[1] for (_, c, _), s in zip(golden, scores, strict=True)]
    mean, std = encoder.backbone.mean.flatten().tolist(), encoder.backbone.std.flatten().tolist()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "run": files.name, "head_name": meta["head"],
        "train_key": meta.get("train_key"), "classes": classes,
        "preprocessing": {"function": "clad_run.preprocess.load_image", "decode": "8-bit RGB, EXIF orientation "
                          "applied, 16-bit and float grayscale scaled by their bit depth",
                          "resize": f.resize, "crop": f.crop, "size": size, "interpolation": "bilinear",
                          "to_unit": "x / 255 -> [0, 1]", "mean": mean, "std": std,
                          "scaling": "(x - mean) / std per channel, then NCHW (clad_run.preprocess.to_network_input)"},
        "features": features, "head": head_spec, "routing": routing,
        "verdicts": {"thresholds": {c: _num(v) for c, v in verdicts.thresholds.items()},
                     "scales": {c: _num(v) for c, v in verdicts.scales.items()}, "sources": verdicts.sources,
                     "normalized_at": verdicts.normalized_at,
                     "rule": "anomalous if score > threshold; normalized = sigmoid((score - threshold) / scale "
                             "+ logit(normalized_at))"},
        "maps": {"size": size, "sigma": cfg.evaluate.sigma, "truncate": 4.0,
                 "upsample": "bilinear, align_corners=False", "blur": "gaussian, mode reflect",
                 "image_score": "max of the map"},
        "golden": {"files": golden_files, "paths": [p for p, _, _ in golden], "classes": [c for _, c, _ in golden],
                   "labels": [int(lb) for _, _, lb in golden], "torch_verdicts": torch_verdicts},
        "versions": _versions(),
    }
    manifest["files"] = {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}
    write_atomic(root / "manifest.json", json.dumps(manifest, indent=2))
    log("export: golden set through the bundle (onnxruntime)")
    manifest["parity"] = measure_parity(root)
    write_atomic(root / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


def measure_parity(root: Path) -> dict[str, Any]:
    """The bundle's scores of its golden set against the torch path's (``clad_run.verify``)."""
    from clad_run.verify import golden_parity

    return golden_parity(root)


def _save(root: Path, rel: str, array: np.ndarray) -> str:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    np.save(root / f"{rel}.npy", np.ascontiguousarray(array), allow_pickle=False)
    return f"{rel}.npy"


def _num(v: float) -> float | None:
    return None if not math.isfinite(v) else float(v)

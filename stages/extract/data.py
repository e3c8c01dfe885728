"""Data sources: index image folders into samples, load and resize images.

Supported layouts (``data.layout``):

* ``mvtec``: ``<class>/train/good``, ``<class>/test/<type>``,
  ``<class>/ground_truth/<type>/<stem>_mask.png``. The root may be one class
  folder or a folder of class folders. VisA in its released split layout
  (``<class>/train/good``, ``<class>/test/{good,bad}``,
  ``<class>/ground_truth/bad/<stem>.png``) is read by the same code.
* ``visa``: the raw VisA release with ``split_csv/1cls.csv``.
* ``folder``: ``<class>/*.png``: normal images only, no test set.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from clad_run import preprocess as _pp
from clad_run.preprocess import IMAGE_SUFFIXES, MIN_SIDE, upright, upright_size  # noqa: F401 - re-exported
from PIL import Image, UnidentifiedImageError

from core.errors import CladError
from core.settings import DataConfig, FeatureConfig



@dataclass(frozen=True)
class Sample:
    """One image of the data set."""

    image_id: str  # "<class>/<split>/<defect>/<stem>", unique
    class_name: str
    split: str  # train | test
    path: str
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" for normals
    mask_path: str = ""  # "" when normal or unknown


def _images_in(folder: Path) -> list[Path]:
    """The images of a folder; a link to an image that is gone is refused (it was dropped silently)."""
    out = []
    for p in folder.iterdir():
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
            continue
        if p.is_symlink() and not p.exists():
            raise CladError(f"{p}: broken symbolic link (to {os.readlink(p)}, which does not exist); "
                            "restore its target or remove the link")
        if p.is_file():
            out.append(p)
    return sorted(out)


def detect_layout(root: Path) -> str:
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    if (root / "train").is_dir() or any((d / "train").is_dir() for d in root.iterdir() if d.is_dir()):
        return "mvtec"
    return "folder"


def index_dataset(cfg: DataConfig, check_masks: bool = True) -> list[Sample]:
    """All samples of the configured data set, sorted, validated.

    Raises CladError naming the folder or file and the fix for a missing or
    empty folder, a class without training images, a defect image without a
    mask, or a mask whose size differs from its image (``check_masks``: that
    last check opens every defect image's header; ``clad status`` skips it).
    """
    if not cfg.root:
        raise CladError("data.root is empty; set it with 'clad init WORK --data PATH'")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise CladError(f"{root}: data folder does not exist; check data.root in config.toml")
    if not any(root.iterdir()):
        raise CladError(f"{root}: data folder is empty; point data.root at a data set "
                        "(or generate one with 'clad demo-data DIR')")
    layout = detect_layout(root) if cfg.layout == "auto" else cfg.layout
    samples = INDEXERS[layout](root)  # DataConfig refuses other words (its declared layouts = INDEXERS + auto)
    if cfg.classes:
        found = {s.class_name for s in samples}
        missing = sorted(set(cfg.classes) - found)
        if missing:
            raise CladError(f"data.classes names {', '.join(missing)} but {root} has only "
                            f"{', '.join(sorted(found))}")
        samples = [s for s in samples if s.class_name in cfg.classes]
    classes = sorted({s.class_name for s in samples})
    if not classes:
        raise CladError(f"{root}: no class folders with images found ({layout} layout)")
    for c in classes:
        if not any(s.class_name == c and s.split == "train" for s in samples):
            raise CladError(f"{root / c}: class {c!r} has no training images; add normal "
                            "images under train/good or drop the class via data.classes")
    if check_masks:
        _check_masks(samples)
    return sorted(samples, key=lambda s: s.image_id)


def _class_dirs(root: Path) -> list[Path]:
    if (root / "train").is_dir():
        return [root]
    for d in sorted(root.iterdir()):
        if d.is_dir() and not (d / "train").is_dir() and ((d / "test").is_dir() or (d / "ground_truth").is_dir()):
            raise CladError(f"{d}: class folder without train/good (normal training images); add them or "
                            "move the folder out of the data set")
    return sorted(d for d in root.iterdir() if d.is_dir() and (d / "train").is_dir())


def _find_mask(gt_dir: Path, stem: str) -> str:
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        if (gt_dir / name).is_file():
            return str(gt_dir / name)
    return ""


def _index_mvtec(root: Path) -> list[Sample]:
    out: list[Sample] = []
    for cdir in _class_dirs(root):
        c = cdir.name
        good = cdir / "train" / "good"
        if not good.is_dir():
            raise CladError(f"{good}: missing; MVTec layout needs <class>/train/good with normal images")
        for p in _images_in(good):
            out.append(Sample(f"{c}/train/good/{p.stem}", c, "train", str(p), 0, "good"))
        test = cdir / "test"
        if not test.is_dir():
            continue
        for ddir in sorted(d for d in test.iterdir() if d.is_dir()):
            defect = ddir.name
            for p in _images_in(ddir):
                label = int(defect != "good")
                mask = _find_mask(cdir / "ground_truth" / defect, p.stem) if label else ""
                if label and not mask:
                    raise CladError(
                        f"{p}: defect image without a mask; expected "
                        f"{cdir / 'ground_truth' / defect / (p.stem + '_mask.png')}")
                out.append(Sample(f"{c}/test/{defect}/{p.stem}", c, "test", str(p), label, defect, mask))
    return out


def _index_visa(root: Path) -> list[Sample]:
    out: list[Sample] = []
    with open(root / "split_csv" / "1cls.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            c, split, label = row["object"], row["split"], row["label"]
            img = root / row["image"]
            if not img.is_file():
                raise CladError(f"{img}: listed in split_csv/1cls.csv but missing")
            is_bad = int(label != "normal")
            defect = "bad" if is_bad else "good"
            mask = str(root / row["mask"]) if is_bad and row.get("mask") else ""
            split = "train" if split == "train" else "test"
            out.append(Sample(f"{c}/{split}/{defect}/{img.stem}", c, split, str(img), is_bad, defect, mask))
    return out


def _index_folder(root: Path) -> list[Sample]:
    out: list[Sample] = []
    for cdir in sorted(d for d in root.iterdir() if d.is_dir()):
        if not _images_in(cdir):
            raise CladError(f"{cdir}: class folder without images; add normal images or move it out of {root}")
        for p in _images_in(cdir):
            out.append(Sample(f"{cdir.name}/train/good/{p.stem}", cdir.name, "train", str(p), 0, "good"))
    return out


# data.layout -> its indexer; the words DataConfig.layout declares are these and "auto" (a test checks)
INDEXERS = {"mvtec": _index_mvtec, "visa": _index_visa, "folder": _index_folder}


def _check_masks(samples: list[Sample]) -> None:
    """Compare mask and image sizes from the file headers only (no decoding)."""
    for s in samples:
        if not s.mask_path:
            continue
        try:
            with Image.open(s.path) as im, Image.open(s.mask_path) as mk:
                isz, msz = upright_size(im), upright_size(mk)
                if isz != msz:
                    raise CladError(f"{s.mask_path}: mask is {msz[0]}x{msz[1]} but its image "
                                    f"{s.path} is {isz[0]}x{isz[1]}; fix or remove the pair")
        except (OSError, UnidentifiedImageError) as exc:
            raise CladError(f"{s.mask_path if 'mask' in str(exc) else s.path}: unreadable ({exc}); "
                            "replace or remove the file") from None


# -- image loading ----------------------------------------------------------
# One implementation, shared with the deploy runtime (clad_run, numpy + pillow only), so that
# training, evaluation, ``clad score`` and ``clad-run`` cannot read an image differently.


def load_rgb(path: str) -> Image.Image:
    """Decode an image fully as 8-bit RGB; a truncated, corrupt or unscalable file is a CladError."""
    try:
        return _pp.load_rgb(path)
    except _pp.ImageError as exc:
        if exc.kind == "missing":
            raise CladError(f"{path}: image file not found (moved or deleted since it was listed); restore the "
                            "file, or run 'clad extract WORK --rebuild' if the data set changed on purpose") from None
        raise CladError(str(exc)) from None


def _resize_crop(im: Image.Image, cfg: FeatureConfig, interpolation: str) -> Image.Image:
    return _pp.resize_crop(im, cfg.resize, cfg.crop, interpolation)


def load_image(path: str, cfg: FeatureConfig) -> np.ndarray:
    """Image as ``[S, S, 3] float32`` in [0, 1], resized then centre-cropped
    (``clad_run.preprocess.load_image``, the deploy runtime's own function)."""
    im = _resize_crop(load_rgb(path), cfg, "bilinear")
    return np.asarray(im, dtype=np.float32) / 255.0


def load_mask(path: str, cfg: FeatureConfig) -> np.ndarray:
    """Ground-truth mask as ``[S, S] uint8`` in {0, 1} (nearest resize)."""
    if not path:
        s = cfg.output_size
        return np.zeros((s, s), np.uint8)
    try:
        with Image.open(path) as mk:
            mk.load()
            im = upright(mk).convert("L")
    except (OSError, UnidentifiedImageError) as exc:
        raise CladError(f"{path}: unreadable mask ({exc}); replace or remove it") from None
    return (np.asarray(_resize_crop(im, cfg, "nearest")) > 0).astype(np.uint8)

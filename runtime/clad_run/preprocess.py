"""Image reading and preprocessing shared by training, ``clad score`` and ``clad-run``
(numpy and pillow only).

An image is decoded, turned upright by its EXIF orientation, made 8-bit RGB
(high-depth grayscale scaled by its real bit depth), resized bilinearly to
``resize`` x ``resize``, centre-cropped to ``crop`` (0 = no crop) and scaled
to float32 in [0, 1]. The scaling to the backbone's input range
(``(x - mean) / std``) is ``to_network_input``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
MIN_SIDE = 16  # px: smaller images carry less than one backbone patch at stride 16
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that turn the picture by 90 degrees
RESAMPLE = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the fix. ``kind``:
    missing | small | bomb | unreadable | depth."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is meant to be seen: its EXIF orientation
    applied (from the header only, nothing decoded)."""
    try:
        turn = im.getexif().get(0x0112) in _SWAPS_SIDES
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels decide (load_rgb reports them)
        turn = False
    return (im.size[1], im.size[0]) if turn else im.size


def upright(im: Image.Image) -> Image.Image:
    """The decoded image turned as its EXIF orientation says (a phone photo
    stored sideways with orientation 6 comes out upright); every image and
    mask is read through here, so training, evaluation, scoring and the
    runtime see the same picture."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: keep the pixels as stored
        return im
    return im if orientation in (None, 1) else ImageOps.exif_transpose(im)


def to_rgb8(im: Image.Image, path: str, src: Image.Image | None = None) -> Image.Image:
    """8-bit RGB from any single-channel depth, scaled by the image's real bit depth.

    Pillow's ``convert("RGB")`` clips 16-bit values at 255 (a 16-bit image
    turns white) and truncates floats (black), so high-depth grayscale is
    scaled here: 16-bit (PNG ``I;16``/``I``, TIFF 16 bits per sample) by
    65535, float in [0, 1] by 1. 32-bit integer and out-of-range float images
    are refused: their scale cannot be known.
    """
    if im.mode in ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "PA", "La", "RGBX"):
        return im.convert("RGB")
    arr = np.asarray(im)
    src = src or im  # the file as opened: its format and TIFF tags (a turned copy has neither)
    bits = src.tag_v2.get(258) if hasattr(src, "tag_v2") else None  # TIFF BitsPerSample
    bits = bits[0] if isinstance(bits, tuple) else bits
    if im.mode.startswith("I;16") or (im.mode == "I" and (src.format == "PNG" or bits == 16)):
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageError(f"{path}: 16-bit image with values outside 0..65535; save it as 8 or 16 bit", "depth")
        gray = arr.astype(np.float64) / 65535.0
    elif im.mode == "F":
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ImageError(f"{path}: float image with values outside [0, 1] ({arr.min():.3g}..{arr.max():.3g}); "
                             "save it as 8 or 16 bit integers", "depth")
        gray = arr.astype(np.float64)
    else:
        raise ImageError(f"{path}: {im.mode} image ({bits or 32}-bit integer) cannot be scaled to 8 bits "
                         "reliably; save it as 8 or 16 bit", "depth")
    g8 = np.round(gray * 255.0).astype(np.uint8)
    return Image.fromarray(np.stack([g8] * 3, -1), "RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode an image fully as upright 8-bit RGB; a missing, truncated, corrupt or unscalable file is an ImageError."""
    try:
        with Image.open(path) as raw:
            raw.load()
            im = upright(raw)
            if min(im.size) < MIN_SIDE:
                raise ImageError(f"{path}: image is {im.size[0]}x{im.size[1]} px, smaller than {MIN_SIDE} px "
                                 "on a side; replace or remove it", "small")
            return to_rgb8(im, path, raw)
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found (moved or deleted since it was listed); restore the file",
                         "missing") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({exc}); replace or remove it",
                         "bomb") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{path}: unreadable or truncated image ({exc}); replace or remove it") from None


def resize_crop(im: Image.Image, resize: int, crop: int, interpolation: str = "bilinear") -> Image.Image:
    """Resize to ``resize`` x ``resize`` (``interpolation``: bilinear | nearest), then
    centre-crop to ``crop`` (0 or >= resize: no crop)."""
    im = im.resize((resize, resize), RESAMPLE[interpolation])
    if crop and crop < resize:
        off = (resize - crop) // 2
        im = im.crop((off, off, off + crop, off + crop))
    return im


def output_size(resize: int, crop: int) -> int:
    """Side length of the network input (and of the anomaly maps)."""
    return crop if crop else resize


def load_image(path: str, resize: int, crop: int, interpolation: str = "bilinear") -> np.ndarray:
    """Image as ``[S, S, 3] float32`` in [0, 1]: upright, RGB, resized then centre-cropped."""
    im = resize_crop(load_rgb(path), resize, crop, interpolation)
    return np.asarray(im, dtype=np.float32) / 255.0


def to_network_input(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """``[n, S, S, 3]`` float32 in [0, 1] -> ``[n, 3, S, S]`` float32 in the backbone's input range."""
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
    return ((x - m) / s).astype(np.float32)

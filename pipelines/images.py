"""Decoding one stored image: the one loader of every backend and of `dogo convert`, so that a file gives the same
pixels everywhere.

An image is decoded to upright 8-bit RGB: EXIF orientation applied; CMYK, grayscale, palette and alpha images
converted as torchvision's ImageFolder loader does (PIL's convert); 16-bit images scaled to 8 bits. A file that
declares more than MAX_PIXELS is refused from its header, before anything is decoded (a decompression bomb), and a
truncated or corrupt one raises one of DECODE_ERRORS with the reason.

JPEGs in RGB or grey go through torchvision.io.decode_jpeg (libjpeg-turbo, 1.6x PIL's decode here:
benchmarks/results/decode_cpu2.json); it gives PIL's pixels bit for bit (tests/test_images.py) and refuses
corrupt data as PIL does. Everything else goes through PIL.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_PIXELS = 400_000_000  # larger is refused: panoramas of a dataset pass, a 30000 x 30000 bomb does not
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own guard, at the same limit (it warns above, refuses at 2x)


class TooManyPixels(ValueError):
    pass


DECODE_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError)
_EXIF_ORIENTATION = 0x0112


def _check_size(im: Image.Image, path: str) -> None:
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise TooManyPixels(f"{path}: declares {w} x {h} = {w * h:,} pixels, over the limit of {MAX_PIXELS:,}")


def _upright_rgb(im: Image.Image) -> np.ndarray:
    """A loaded PIL image -> upright (H, W, 3) uint8."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit integer) grey: the full 16-bit range onto 8 bits
        grey = np.asarray(im, dtype=np.float64) / 257.0
        return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode == "F":
        raise ValueError("floating-point image (mode F) has no defined 8-bit mapping")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_rgb(path: str, max_resolution: int | None = None, draft_only: bool = False) -> np.ndarray:
    """Decode `path` to upright (H, W, 3) uint8.

    max_resolution: JPEGs are decoded at the smallest DCT scale whose sides still cover it (convert's
    --max-resolution). draft_only: JPEGs at their smallest DCT scale (1/8), which still reads all of their data: the
    quick check of `dogo convert`.
    """
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        _check_size(im, path)
        if im.format == "JPEG":
            target = (1, 1) if draft_only else (max_resolution, max_resolution) if max_resolution else None
            if target:
                im.draft("RGB", target)
            elif im.mode in ("RGB", "L"):
                return _decode_jpeg(data)
        im.load()
        return _upright_rgb(im)


def _decode_jpeg(data: bytes) -> np.ndarray:
    # torchvision 0.29 (pinned) announces that its decoders will move to torchcodec; they work, so say it once
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                        apply_exif_orientation=True)
    return t.permute(1, 2, 0).numpy()


def open_rgb(path: str) -> Image.Image:
    """load_rgb as a PIL image (evaluation's resize and centre crop)."""
    return Image.fromarray(load_rgb(path))

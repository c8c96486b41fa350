"""Decoding one stored image: the one loader of every backend and of `dogo convert`, so that a file gives the same
pixels everywhere.

An image is decoded to upright 8-bit RGB: EXIF orientation applied; CMYK, grayscale, palette and alpha images
converted as torchvision's ImageFolder loader does (PIL's convert); 16-bit images scaled to 8 bits. A file that
declares more than MAX_PIXELS is refused from its header, before anything is decoded (a decompression bomb), and a
truncated or corrupt one raises one of DECODE_ERRORS with the reason.

A JPEG's bytes are checked first (structural_problem: libjpeg decodes random corruption with only a warning).
JPEGs in RGB or grey go through torchvision.io.decode_jpeg (libjpeg-turbo, faster than PIL's decode on our CPU);
it gives PIL's pixels bit for bit (tests/test_images.py) and refuses
corrupt data as PIL does. Everything else goes through PIL.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Larger is refused: panoramas of a dataset pass (14,000 x 14,000), a 30000 x 30000 bomb does not. Decoding peaks at
# about 10 bytes per pixel (PIL's 4-byte pixels, then the array), 2 GB at the limit: 4 workers stay within 8 GB.
MAX_PIXELS = 200_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own guard, at the same limit (it warns above, refuses at 2x)


class TooManyPixels(ValueError):
    pass


DECODE_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError)
_EXIF_ORIENTATION = 0x0112


def skip_reason(path: str, exc: BaseException) -> str:
    """Why a file could not be decoded, in one line, without the path (the decoders' messages often start with it)."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return reason.removeprefix(f"{path}: ")[:300]


def skip_line(path: str, exc: BaseException) -> str:
    """'path: reason' for a file that could not be decoded, the path said once."""
    return f"{path}: {skip_reason(path, exc)}"


def _check_size(im: Image.Image, path: str) -> None:
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise TooManyPixels(f"{path}: declares {w} x {h} = {w * h:,} pixels, over the limit of {MAX_PIXELS:,}")


def _upright_rgb(im: Image.Image) -> np.ndarray:
    """A loaded PIL image -> upright (H, W, 3) uint8, with as few whole-image copies as PIL allows: a 400 M-pixel
    PNG peaked at 7.75 GB with a copy per step (exif_transpose and convert copy even when they change nothing);
    tests/test_faults.py holds the peak per pixel."""
    upright = ImageOps.exif_transpose(im, in_place=True)  # None: turned in place, or nothing to turn
    im = im if upright is None else upright
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit integer) grey: the full 16-bit range onto 8 bits
        grey = np.asarray(im, dtype=np.float64) / 257.0
        return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode == "F":
        raise ValueError("floating-point image (mode F) has no defined 8-bit mapping")
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)


def load_rgb(path: str, max_resolution: int | None = None, draft_only: bool = False) -> np.ndarray:
    """Decode `path` to upright (H, W, 3) uint8.

    max_resolution: JPEGs are decoded at the smallest DCT scale whose sides still cover it (convert's
    --max-resolution). draft_only: JPEGs at their smallest DCT scale (1/8), which still reads all of their data: the
    quick check of `dogo convert`.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own guard, at twice the limit: the same refusal
        raise TooManyPixels(f"{path}: {exc}") from None
    except UnidentifiedImageError:  # PIL's message names its BytesIO object, not the file
        raise ValueError(f"{path}: " + ("a zero-byte file" if not data else "not an image PIL can read")) from None
    with opened as im:
        _check_size(im, path)
        if im.format == "JPEG":
            # libjpeg only warns on corrupt entropy-coded data and decodes garbage: refuse it, as DALI's check does
            problem = _jpeg_problem(data, data[-64:], whole=True)
            if problem:
                raise ValueError(f"{path}: {problem}")
            target = (1, 1) if draft_only else (max_resolution, max_resolution) if max_resolution else None
            with _libjpeg_warnings_refused(path):
                if target:
                    _reduced_decode(data, path)  # PIL's libjpeg keeps its warnings to itself: OpenCV's says them
                    im.draft("RGB", target)
                elif im.mode in ("RGB", "L"):
                    return _decode_jpeg(data)
                im.load()
        else:
            im.load()
        return _upright_rgb(im)


def load_many(paths: list[str]) -> list[np.ndarray | str]:
    """load_rgb of each path, in order: its image, or for a file it refuses the skip line saying why.

    Made for many small images (a whole split of CIFAR-size JPEGs held in memory): the JPEGs in RGB or grey whose
    bytes pass load_rgb's checks go to the decoder load_rgb uses for them (the same pixels) in one call, without
    opening each with PIL first, with libjpeg's warnings captured once for all of them rather than per file. If that
    call fails or a corrupt-data warning comes, those files are decoded again one by one with load_rgb, which names
    the file at fault. Every other file goes through load_rgb itself."""
    out: list[np.ndarray | str | None] = [None] * len(paths)
    fast = {i: data for i, data in enumerate(map(_plain_jpeg_bytes, paths)) if data is not None}
    if fast:
        try:
            with _libjpeg_warnings_refused(f"one of {len(fast)} files"):
                for i, image in zip(fast, _decode_jpegs(list(fast.values()))):
                    out[i] = image
        except (ValueError, RuntimeError):  # a corrupt-data warning, or a file the decoder refused
            for i in fast:
                out[i] = None
    for i, path in enumerate(paths):
        if out[i] is None:
            try:
                out[i] = load_rgb(path)
            except DECODE_ERRORS as exc:
                out[i] = skip_line(path, exc)
    return out


def _plain_jpeg_bytes(path: str) -> bytes | None:
    """The bytes of a JPEG in RGB or grey that pass load_rgb's checks (those load_rgb hands to _decode_jpeg); None
    for anything else (load_rgb then decides, and names what is wrong)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    problem, components = _jpeg_check(data, data[-64:], whole=True)
    return data if problem is None and components in (1, 3) else None


# libjpeg's warnings on corrupt data (a zero-filled block, a lost marker): it decodes the rest as noise and says so
# on stderr only, in the same words from PIL, torchvision and OpenCV alike
LIBJPEG_CORRUPTION = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid SOS parameters")
_capture: tuple[int, int] | None = None  # (pid, memfd): each process its own, forked workers included
_capture_lock = threading.Lock()  # file descriptor 2 is the process's: one capture at a time


@contextlib.contextmanager
def _libjpeg_warnings_refused(path: str):
    """Run a JPEG decode with file descriptor 2 captured (libjpeg writes its warnings there, below Python); a
    corrupt-data warning makes the decode a ValueError naming the file, anything else is passed on to stderr.
    Decodes in one process's threads take turns (the loaders decode in processes, one thread each)."""
    global _capture
    with _capture_lock:
        if _capture is None or _capture[0] != os.getpid():
            _capture = (os.getpid(), os.memfd_create("dogo-libjpeg-warnings", os.MFD_CLOEXEC))
        fd = _capture[1]
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)  # fd 2 will share this offset
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(fd, 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            said = os.pread(fd, 1 << 16, 0).decode(errors="replace")
            corrupt = [line for line in said.splitlines() if line.startswith(LIBJPEG_CORRUPTION)]
            if said and not corrupt:
                sys.stderr.write(said)
    if corrupt:
        raise ValueError(f"{path}: corrupt JPEG data (libjpeg: {corrupt[0].strip()})")


def _reduced_decode(data: bytes, path: str) -> None:
    """Decode a JPEG at 1/8 scale with OpenCV (all of its entropy-coded data is still read), for libjpeg's
    corrupt-data warnings, which PIL's decoder silences."""
    import cv2
    if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_8 | cv2.IMREAD_IGNORE_ORIENTATION) is None:
        raise ValueError(f"{path}: OpenCV cannot decode this JPEG")


def _decode_jpeg(data: bytes) -> np.ndarray:
    return _decode_jpegs([data])[0]


def _decode_jpegs(datas: list[bytes]) -> list[np.ndarray]:
    """JPEGs in RGB or grey to upright (H, W, 3) uint8, with torchvision's decoder (libjpeg-turbo)."""
    # torchvision 0.29 (pinned) announces that its decoders will move to torchcodec; they work, so say it once
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        images = decode_jpeg([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas],
                             mode=ImageReadMode.RGB, apply_exif_orientation=True)
    return [t.permute(1, 2, 0).numpy() for t in images]


def stored_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header, nothing decoded (a DECODE_ERRORS exception for a file that is not an
    image)."""
    with Image.open(path) as im:
        return im.size


def open_rgb(path: str) -> Image.Image:
    """load_rgb as a PIL image (evaluation's resize and centre crop)."""
    return Image.fromarray(load_rgb(path))


def structural_problem(path: str, whole: bool = True) -> str | None:
    """Why a file cannot be trusted as a whole JPEG or PNG of at most MAX_PIXELS without decoding it, or None.

    Reads the file but decodes nothing: the markers of a JPEG up to its first scan (the frame's declared size),
    with whole=True every byte of its entropy-coded data (where 0xFF must be followed by 0x00, a restart or another
    marker: random corruption breaks that almost surely), and its end-of-image marker; a PNG's IHDR size and IEND.
    whole=False reads only the first 64 kB and the last 64 bytes (truncation and size, not corruption). A file
    with a problem other than its size can still be decoded to make sure (load_rgb)."""
    try:
        with open(path, "rb") as f:
            data = f.read() if whole else f.read(65536)
            if not whole:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - 64))
                tail = f.read()
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    tail = data[-64:] if whole else tail
    if not data:
        return "zero-byte file"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(data) < 24 or data[12:16] != b"IHDR":
            return "a PNG without its header"
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if w * h > MAX_PIXELS:
            return f"declares {w} x {h} pixels, over the limit of {MAX_PIXELS:,}"
        return None if b"IEND" in tail else "truncated (no IEND)"
    if not data.startswith(b"\xff\xd8\xff"):
        return "not a JPEG or PNG"
    return _jpeg_problem(data, tail, whole)


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_frame(data: bytes) -> tuple[str | None, int, int]:
    """Walk a JPEG's markers up to its first scan: (problem or None, where the entropy-coded data starts, the
    frame's colour components: 1 grey, 3 YCbCr or RGB, 4 CMYK or YCCK; 0 if no frame was read)."""
    pos, size, components = 2, None, 0
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return "corrupt markers before the image data", pos, components
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF and pos + 10 <= len(data):
            size = (int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big"))
            components = data[pos + 9]
            if size[0] * size[1] > MAX_PIXELS:
                return f"declares {size[0]} x {size[1]} pixels, over the limit of {MAX_PIXELS:,}", pos, components
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            pos += 2 + length
            break
        pos += 2 + length
    else:
        return "truncated before its image data", pos, components
    if size is None:
        return "no frame header before the image data", pos, components
    return None, pos, components


def _jpeg_problem(data: bytes, tail: bytes, whole: bool) -> str | None:
    return _jpeg_check(data, tail, whole)[0]


def _jpeg_check(data: bytes, tail: bytes, whole: bool) -> tuple[str | None, int]:
    """(why the JPEG `data` cannot be trusted, or None; its frame's colour components)."""
    problem, pos, components = _jpeg_frame(data)
    if problem == "truncated before its image data" and not whole:
        return None, components  # only the first 64 kB were read: the scan may start further on
    if problem or not whole:
        return problem or (None if b"\xff\xd9" in tail else "truncated (no end-of-image marker)"), components
    end = data.find(b"\xff\xd9", pos)  # the end of image: in coded data 0xFF 0xD9 is nothing else
    if end < 0:
        return "truncated (no end-of-image marker)", components
    coded = np.frombuffer(data, np.uint8, count=end - pos, offset=pos)  # what follows the end is not read
    after_ff = coded[1:][coded[:-1] == 0xFF]
    if ((after_ff >= 0x01) & (after_ff <= 0xBF)).any():
        return "corrupt image data (a byte sequence no JPEG encoder writes)", components
    return None, components

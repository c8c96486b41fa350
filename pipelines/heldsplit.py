"""A split of small images read whole into memory, as one uint8 array (N, 3, H, W): what the held backend keeps on
the training device (pipelines/backends/held.py). Its source is found from data.path:

- CIFAR-10/100's python format as users download it (`cifar-10-batches-py/` or `cifar-100-python/`, or a folder
  holding one): splits train and test (`val` reads the test batch too, so that one config serves both sources);
- an image folder (ImageFolder's layout, data.path/<split>/<class>/<image>), every image of one size (CIFAR's
  32 px, STL's 96 px): decoded once, in processes, with pipelines.images (the pixels every backend gives), the
  files that do not decode skipped and reported as everywhere.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dogo.core.errors import DataError
from dogo.pipelines.base import die_with_parent
from dogo.pipelines.imagefolder import ImageFolderIndex, class_folders, scan
from dogo.pipelines.images import DECODE_ERRORS, load_many

CIFAR_SIDE = 32


@dataclass
class HeldSplit:
    images: np.ndarray  # uint8 (N, 3, H, W)
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    source: Path
    skipped: list[str] = field(default_factory=list)  # "path: reason" for each file left out

    def __len__(self) -> int:
        return len(self.labels)


EXPECTED = ("data.path must be CIFAR's python format as downloaded (cifar-10-batches-py/ or cifar-100-python/, or "
            "a folder holding one) or an image folder of one image size (data.path/train/<class>/<image>.jpg, "
            "data.path/val/<class>/<image>.jpg)")


def read_split(path: str | Path, split: str, processes: int = 1, train_split: str = "train") -> HeldSplit:
    """Split `split` of the dataset at `path`, whichever source it is. processes: decoding processes for an image
    folder; train_split: the folder split whose class folders name the labels (every split is labelled by it)."""
    cifar = find_cifar(path)
    if cifar is not None:
        return read_cifar(*cifar, split)
    return decode_folder(_split_folder(path, split), _folder_classes(path, train_split), processes)


def split_shape(path: str | Path, split: str) -> tuple[int, int, int]:
    """(images, height, width) of a split before it is held (its size in memory): CIFAR's read (a fraction of a
    second), a folder's from its listing and its first image's header, nothing decoded."""
    cifar = find_cifar(path)
    if cifar is not None:
        return read_cifar(*cifar, split).images.shape[:1] + (CIFAR_SIDE, CIFAR_SIDE)
    index = scan(_split_folder(path, split))
    return len(index), *_header_size(index)


def _folder_classes(path: str | Path, train_split: str) -> list[str]:
    return class_folders(_split_folder(path, train_split))


def _split_folder(path: str | Path, split: str) -> Path:
    """data.path/split, which must exist when data.path is not CIFAR's python format."""
    if not (Path(path) / split).is_dir():
        raise DataError(f"{path}: neither CIFAR's python format nor an image folder (no {split}/ inside); {EXPECTED}")
    return Path(path) / split


# -------------------------------------------------------------------------------------------------------------
# CIFAR's python format

@dataclass(frozen=True)
class CifarFormat:
    folder: str  # the folder name as downloaded
    splits: dict  # split name -> glob of its batch files
    label_key: str
    meta_file: str
    names_key: str


FORMATS = (
    CifarFormat("cifar-10-batches-py", {"train": "data_batch_*", "test": "test_batch"}, "labels", "batches.meta",
                "label_names"),
    CifarFormat("cifar-100-python", {"train": "train", "test": "test"}, "fine_labels", "meta", "fine_label_names"),
)
CIFAR_ALIASES = {"val": "test"}  # image folders call the held-out split val


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's batches are pickles of dicts of numpy arrays: refuse anything else a pickle could construct."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}  # encode: bytes in protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{path} is not a readable CIFAR python batch ({type(exc).__name__}: {exc}); "
                        f"the file is truncated or not CIFAR's: download it again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not CIFAR's dict of arrays; download it again")
    return {_text(k): v for k, v in obj.items()}  # keys are str from Python 2's pickles, bytes from Python 3's


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def find_cifar(path: str | Path) -> tuple[Path, CifarFormat] | None:
    """The CIFAR python-format folder at `path` or directly inside it, and its format; None if there is none."""
    path = Path(path)
    for fmt in FORMATS:
        for folder in (path, path / fmt.folder):
            if (folder / fmt.meta_file).is_file():
                return folder, fmt
    return None


def _cifar_files(folder: Path, fmt: CifarFormat, split: str) -> list[Path]:
    name = CIFAR_ALIASES.get(split, split)
    if name not in fmt.splits:
        raise DataError(f"CIFAR's python format has the splits {' and '.join(fmt.splits)} (val reads test), not "
                        f"{split!r}: set data.train_split=train and data.val_split=val")
    files = sorted(folder.glob(fmt.splits[name]))
    if not files:
        raise DataError(f"{folder}: no {fmt.splits[name]} file for the {split} split; {EXPECTED}")
    return files


def read_cifar(folder: Path, fmt: CifarFormat, split: str) -> HeldSplit:
    """One split of a CIFAR python-format folder; a malformed file is named in the error."""
    files = _cifar_files(folder, fmt, split)
    meta = _load_pickle(folder / fmt.meta_file)
    classes = meta.get(fmt.names_key)
    if not isinstance(classes, list) or not classes:
        raise DataError(f"{folder / fmt.meta_file} has no '{fmt.names_key}' list; download it again")
    images, labels = [], []
    for file in files:
        batch = _load_pickle(file)
        data, y = batch.get("data"), batch.get(fmt.label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or \
                data.shape[1] != 3 * CIFAR_SIDE ** 2:
            raise DataError(f"{file}: 'data' is not a uint8 array of N x {3 * CIFAR_SIDE ** 2} pixels; download it "
                            f"again")
        y = np.asarray(y if y is not None else [], dtype=np.int64)
        if len(y) != len(data):
            raise DataError(f"{file}: {len(data)} images but {len(y)} '{fmt.label_key}'; download it again")
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"{file}: labels outside 0..{len(classes) - 1}; download it again")
        images.append(data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE))
        labels.append(y)
    return HeldSplit(np.concatenate(images), np.concatenate(labels), [_text(c) for c in classes], folder)


# -------------------------------------------------------------------------------------------------------------
# Image folders

MAX_SIZES_NAMED = 3


def decode_folder(root: Path, classes: list[str], processes: int) -> HeldSplit:
    """Every image of the split folder `root` decoded into one array; `processes` decode chunks of files in
    parallel (in order). Files that do not decode, and entries the scan could not list, are skipped and reported;
    images of another size than the first one are an error (the held backend needs one size)."""
    index = scan(root, classes)
    n = len(index)
    chunk = max(64, min(2048, math.ceil(n / (max(1, processes) * 4))))  # a few chunks per process: balanced ends
    held = _Filling(n, list(index.skipped))
    with contextlib.closing(_decoded_chunks([index.paths[i:i + chunk] for i in range(0, n, chunk)], processes)) \
            as chunks:  # the processes end here, error or not
        for k, (groups, skipped) in enumerate(chunks):
            held.put(k * chunk, groups, skipped, index.paths)
    if held.images is None:
        raise DataError(f"none of the {n} files under {root} could be decoded; the first: {held.skipped[0]}")
    if held.odd:
        h, w = held.images.shape[2:]
        examples = ", ".join(f"{p} ({a} x {b})" for p, (a, b) in held.odd[:MAX_SIZES_NAMED])
        raise DataError(f"{root}: data.backend=held holds images of one size, and {len(held.odd)} of {n} differ from "
                        f"the first one's {h} x {w} (height x width), e.g. {examples}: use data.backend=folder, "
                        f"which crops images of any size, or resize the folder's images to one size")
    keep = held.keep
    return HeldSplit(held.images if keep.all() else held.images[keep], index.labels[keep], index.classes, root,
                     held.skipped)


def _decode_chunk(paths: list[str]) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[int, str]]]:
    """load_many of `paths` as (groups, skipped): the images of each size stacked in one (k, 3, H, W) array beside
    their positions in `paths` (one array to hand back per size, not one per image), and (position, skip line) for
    the files refused."""
    by_size: dict[tuple[int, int], list[int]] = {}
    decoded = load_many(paths)
    skipped = []
    for i, image in enumerate(decoded):
        if isinstance(image, str):
            skipped.append((i, image))
        else:
            by_size.setdefault(image.shape[:2], []).append(i)
    groups = [(np.asarray(rows), np.stack([decoded[i] for i in rows]).transpose(0, 3, 1, 2).copy())
              for rows in by_size.values()]
    return groups, skipped


class _Filling:
    """The split's array while decoded chunks arrive in order: made at the first decodable image's size; a skipped
    file or an image of another size leaves its row out."""

    def __init__(self, n: int, skipped: list[str]):
        self.images: np.ndarray | None = None
        self.keep = np.ones(n, dtype=bool)
        self.skipped, self.odd = skipped, []

    def put(self, offset: int, groups, skipped: list[tuple[int, str]], paths: list[str]) -> None:
        for i, line in skipped:
            self.skipped.append(line)
            self.keep[offset + i] = False
        for rows, pixels in sorted(groups, key=lambda g: g[0][0]):  # the chunk's first image first
            if self.images is None:
                self.images = np.empty((len(self.keep), *pixels.shape[1:]), dtype=np.uint8)
            if pixels.shape[1:] == self.images.shape[1:]:
                self.images[offset + rows] = pixels
                continue
            self.keep[offset + rows] = False
            self.odd.extend((paths[offset + i], pixels.shape[2:]) for i in rows)


def _decoded_chunks(jobs: list[list[str]], processes: int):
    """_decode_chunk of each job, in order: in `processes` forked processes (libjpeg's warnings are caught per
    process), or here when one is enough."""
    if processes <= 1 or len(jobs) <= 1:
        yield from map(_decode_chunk, jobs)
        return
    with mp.get_context("fork").Pool(min(processes, len(jobs)), initializer=die_with_parent) as pool:
        yield from pool.imap(_decode_chunk, jobs)


def _header_size(index: ImageFolderIndex) -> tuple[int, int]:
    """(height, width) of the first image whose header reads (the size the split is held at)."""
    from PIL import Image
    for path in index.paths:
        try:
            with Image.open(path) as im:
                return im.height, im.width
        except DECODE_ERRORS:
            continue
    raise DataError(f"none of the {len(index)} files under {index.root} is an image PIL can read")

"""CIFAR-10 / CIFAR-100 backend: the whole split lives on the training device as one uint8 tensor.

Reads the python format as users download it (`cifar-10-batches-py/` or `cifar-100-python/`). Every view is made on
the device: per-image random resized crop boxes, one resampling op for the batch, then the shared batched recipe
(dogo.pipelines.recipe.device). No worker processes; per step and view one small host-to-device copy (crop boxes, flips,
the sorted rows), asynchronous. Order, sharding and parameters follow base.Shard and params.py, as every backend.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dogo.pipelines.recipe import params as P
from dogo.pipelines.recipe.device import DeviceRecipe, normalise, plan, resized_crops, to_device
from dogo.core.errors import DataError
from dogo.pipelines.base import ShardedLoader, TwoViewBatch

SIDE = 32


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
EXPECTED = ("data.path must be a CIFAR python-format folder as downloaded: cifar-10-batches-py/ (data_batch_1..5, "
            "test_batch, batches.meta) or cifar-100-python/ (train, test, meta), or a folder holding one")


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


def find_format(path: str | Path) -> tuple[Path, CifarFormat]:
    """The CIFAR folder at `path` or directly inside it, and its format."""
    path = Path(path)
    for fmt in FORMATS:
        for folder in (path, path / fmt.folder):
            if (folder / fmt.meta_file).is_file():
                return folder, fmt
    raise DataError(f"{path}: no CIFAR meta file found; {EXPECTED}")


@dataclass
class CifarSplit:
    images: np.ndarray  # uint8 (N, 3, 32, 32)
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    source: Path

    def __len__(self) -> int:
        return len(self.labels)


def read_split(path: str | Path, split: str) -> CifarSplit:
    """One split ('train' or 'test') of the CIFAR folder at `path`; a malformed file is named in the error."""
    folder, fmt = find_format(path)
    if split not in fmt.splits:
        raise DataError(f"CIFAR has the splits {' and '.join(fmt.splits)}, not {split!r}: set data.train_split=train "
                        f"and data.val_split=test")
    files = sorted(folder.glob(fmt.splits[split]))
    if not files:
        raise DataError(f"{folder}: no {fmt.splits[split]} file for the {split} split; {EXPECTED}")
    meta = _load_pickle(folder / fmt.meta_file)
    classes = meta.get(fmt.names_key)
    if not isinstance(classes, list) or not classes:
        raise DataError(f"{folder / fmt.meta_file} has no '{fmt.names_key}' list; download it again")
    images, labels = [], []
    for file in files:
        batch = _load_pickle(file)
        data, y = batch.get("data"), batch.get(fmt.label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or \
                data.shape[1] != 3 * SIDE * SIDE:
            raise DataError(f"{file}: 'data' is not a uint8 array of N x {3 * SIDE * SIDE} pixels; download it again")
        y = np.asarray(y if y is not None else [], dtype=np.int64)
        if len(y) != len(data):
            raise DataError(f"{file}: {len(data)} images but {len(y)} '{fmt.label_key}'; download it again")
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"{file}: labels outside 0..{len(classes) - 1}; download it again")
        images.append(data.reshape(-1, 3, SIDE, SIDE))
        labels.append(y)
    return CifarSplit(np.concatenate(images), np.concatenate(labels), [_text(c) for c in classes], folder)


class CifarLoader(ShardedLoader):
    """Two-view batches of a CIFAR training split held on `device` (the TwoViewLoader protocol)."""

    def __init__(self, path: str | Path, split: str, *, image_size: int, global_batch: int, n_views: int, recipe,
                 seed: int, rank: int, world_size: int, device: torch.device, dtype: torch.dtype,
                 channels_last: bool, compile_recipe: bool = False):
        data = read_split(path, split)
        super().__init__(len(data), global_batch=global_batch, rank=rank, world_size=world_size, seed=seed,
                         where=str(data.source))
        self.num_classes = len(data.classes)
        self.images = torch.from_numpy(data.images).to(device)  # 150 MB for CIFAR's 50,000 training images
        self.labels = torch.from_numpy(data.labels).to(device)
        self.size, self.n_views, self.device, self.recipe = image_size, n_views, device, recipe
        self.device_recipe = DeviceRecipe(recipe, image_size, device, dtype, channels_last, compile=compile_recipe)

    def batches(self, epoch: int, start_step: int) -> Iterator[TwoViewBatch]:
        b, r = self.shard.local_batch, self.recipe
        # this rank's rows of every remaining step, copied to the device once per epoch
        order = self.shard.epoch_indices(epoch, start_step)
        order_t = to_device(order, self.device)
        for k, step in enumerate(range(start_step, self.steps_per_epoch)):
            ids = order[k * b:(k + 1) * b]
            step_rows = order_t[k * b:(k + 1) * b]
            images = self.images.index_select(0, step_rows)  # every view crops from the same gathered images
            views = []
            for v in range(self.n_views):
                keys = P.stream_keys(self.seed, epoch, ids, v)
                p = P.draw(r, keys)
                # one copy of the rows' boxes and flips for the view
                boxes = P.crop_boxes(keys, SIDE, SIDE, r.crop_scale, r.crop_ratio)
                rows_t = to_device(np.concatenate([boxes.reshape(-1), p.flip]).astype(np.int64), self.device)
                box_t, flip_t = rows_t.split([4 * b, b])
                crops = resized_crops(images, box_t.view(b, 4), flip_t.bool(), self.size)
                views.append(self.device_recipe.apply(crops, plan(p)))
            yield TwoViewBatch(views, self.labels.index_select(0, step_rows))


class CifarEvalSplit:
    """A CIFAR split for kNN and the linear probe: whole frames, resized to the training view size if it differs
    (CIFAR is evaluated on the uncropped 32 px image)."""

    def __init__(self, path: str | Path, split: str, image_size: int):
        data = read_split(path, split)
        self.classes, self.source, self.size = data.classes, data.source, image_size
        self.where = f"{data.source} ({split} split)"
        self._images, self._labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)

    def __len__(self) -> int:
        return len(self._labels)

    def batches(self, positions: np.ndarray, batch_size: int, device: torch.device, recipe, dtype: torch.dtype,
                channels_last: bool):
        images = self._images.to(device)
        labels = self._labels.to(device)
        pos = torch.from_numpy(np.asarray(positions, dtype=np.int64)).to(device)
        for idx in pos.split(batch_size):
            x = images.index_select(0, idx).float()
            if self.size != SIDE:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                  antialias=self.size < SIDE)
            yield normalise(x, recipe, dtype, channels_last), labels.index_select(0, idx)


def make_loader(data, *, place: str, **common) -> CifarLoader:
    """The registry's entry: the split named data.train_split of the CIFAR folder at data.path. Every view is made
    on the device, whatever augment.place says (there is no decoding to spread over workers)."""
    return CifarLoader(data.path, data.train_split, **common)


def open_eval_split(data, split: str, workers: int) -> CifarEvalSplit:
    return CifarEvalSplit(data.path, split, data.image_size)


SPLITS = ("train", "test")  # what `python -m dogo.pipelines.check cifar PATH` reads


def describe_split(path: str, split: str) -> str:
    """One line counting a split (the data check before a long run); DataError when it cannot be read."""
    data = read_split(path, split)
    return f"{data.source} {split}: {len(data):,} images in {len(data.classes)} classes"

"""Held backend: a dataset of small images (CIFAR's 32 px, STL's 96 px, any folder whose images share one size and
fit the device) lives on the training device as one uint8 tensor, and every view is made there.

The source is found from data.path (pipelines/heldsplit.py): CIFAR's python format as downloaded, or an image folder
decoded once at start by data.workers processes. Every view: per-image random resized crop boxes, one resampling op
for the batch at its group's size, then the shared batched recipe (dogo.pipelines.recipe.device) into the view's rows
of its group's tensor. No worker processes while training; per step and group one small host-to-device copy (every
view's crop boxes and flips), asynchronous. Order, sharding
and parameters follow base.Shard and params.py, as every backend. A split too large to hold is an error naming the
folder backend, which decodes in workers every epoch instead.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dogo.core.environment import available_bytes
from dogo.core.errors import DataError
from dogo.pipelines.base import LoaderSpec, ShardedLoader, ViewBatch
from dogo.pipelines.heldsplit import HeldSplit, read_split, split_shape
from dogo.pipelines.recipe import params as P
from dogo.pipelines.recipe.device import normalise, plan, resized_crops, to_device

# The held split may take at most this share of what the device (and the host, which decodes it first) has
# available: the training step needs the rest.
HOLD_SHARE = 0.5
_GIB = 1024 ** 3


class HeldLoader(ShardedLoader):
    """Batches of views of a split held on the training device (the ViewLoader protocol)."""

    def __init__(self, split: HeldSplit, spec: LoaderSpec):
        super().__init__(len(split), spec, where=str(split.source))
        self._report = self.note_skipped(split.skipped)  # reported with the first batch, as the folder backend does
        self.num_classes = len(split.classes) or None
        self.images = torch.from_numpy(split.images).to(spec.device)  # 150 MB for CIFAR's 50,000 training images
        self.labels = torch.from_numpy(split.labels).to(spec.device)
        self.height, self.width = split.images.shape[2:]
        self.recipes = self.device_recipes()

    def batches(self, epoch: int, start_step: int) -> Iterator[ViewBatch]:
        b = self.shard.local_batch
        # this rank's rows of every remaining step, copied to the device once per epoch
        order = self.shard.epoch_indices(epoch, start_step)
        order_t = to_device(order, self.device)
        for k, step in enumerate(range(start_step, self.steps_per_epoch)):
            ids = order[k * b:(k + 1) * b]
            step_rows = order_t[k * b:(k + 1) * b]
            images = self.images.index_select(0, step_rows)  # every view crops from the same gathered images
            groups = [self._group(g, images, epoch, ids) for g in range(len(self.plan.groups))]
            skipped, self._report = self._report, []
            yield ViewBatch(groups, self.labels.index_select(0, step_rows), skipped=skipped)

    def _group(self, g: int, images: torch.Tensor, epoch: int, ids: np.ndarray) -> torch.Tensor:
        """Group g's views of the batch's images: each view's crops, then the recipe into its rows."""
        group, b = self.plan.groups[g], len(ids)
        keys = [P.stream_keys(self.seed, epoch, ids, spec.stream) for spec in group.views]
        params = [P.draw(spec.recipe, key) for spec, key in zip(group.views, keys)]
        boxes = [P.crop_boxes(key, self.height, self.width, spec.recipe.crop_scale, spec.recipe.crop_ratio)
                 for spec, key in zip(group.views, keys)]
        # one copy of every view's boxes and flips
        rows_t = to_device(np.concatenate([x.reshape(-1) for x in (*boxes, *(p.flip for p in params))])
                           .astype(np.int64), self.device)
        n = len(group.views)
        box_t, flip_t = rows_t.split([4 * b * n, b * n])
        out = self.group_output(g)
        for v, p in enumerate(params):
            crops = resized_crops(images, box_t[4 * b * v:4 * b * (v + 1)].view(b, 4),
                                  flip_t[b * v:b * (v + 1)].bool(), group.size)
            self.recipes[g].apply(crops, plan(p), out=out[v * b:(v + 1) * b])
        return out


class HeldEvalSplit:
    """A held split for kNN and the linear probe: whole frames (a square image is evaluated uncropped, resized to the
    training view size if it differs; another shape resized by its short side and centre-cropped), kept in host
    memory and copied to the device a batch at a time."""

    def __init__(self, split: HeldSplit, image_size: int):
        self.classes, self.source, self.size = split.classes, split.source, image_size
        self.where = str(split.source)  # how an evaluation's error names the split
        self.skipped = split.skipped
        self._images, self._labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)

    def __len__(self) -> int:
        return len(self._labels)

    def batches(self, positions: np.ndarray, batch_size: int, device: torch.device, recipe, dtype: torch.dtype,
                channels_last: bool):
        pos = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        for idx in pos.split(batch_size):
            x = self._images.index_select(0, idx).to(device, non_blocking=True)
            x = whole_frames(x.float(), self.size)
            yield normalise(x, recipe, dtype, channels_last), self._labels.index_select(0, idx).to(device)


def whole_frames(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) float images as size x size frames: resized by the short side (antialiased when shrinking),
    then the centre; unchanged when they already are."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (rh - size) // 2, (rw - size) // 2
    return x[..., top:top + size, left:left + size]


def check_holdable(path: str | Path, split: str, device: torch.device) -> None:
    """A DataError naming the folder backend when the split would take more than HOLD_SHARE of what the device,
    or the host that decodes it, has available."""
    n, h, w = split_shape(path, split)
    need = n * 3 * h * w
    for where in dict.fromkeys([device, torch.device("cpu")]):
        limit = available_bytes(where)
        if need > HOLD_SHARE * limit:
            kind = "GPU" if where.type == "cuda" else "host (CPU memory)"
            raise DataError(f"{Path(path) / split}: its {n:,} images of {h} x {w} take {need / _GIB:.1f} GiB held "
                            f"whole, over {HOLD_SHARE:.0%} of the {limit / _GIB:.1f} GiB this {kind} has available: "
                            f"train it with data.backend=folder (decoded in workers every epoch), or convert it for "
                            f"data.backend=ffcv")


def held_bytes(data) -> int:
    """Bytes the training split takes on the device (the memory estimate counts them): pixels and labels."""
    n, h, w = split_shape(data.path, data.train_split)
    return n * (3 * h * w + 8)


def typical_side(data) -> int:
    """The images' shorter side (data.image_size=auto): held splits are of one size (32 for CIFAR's format)."""
    _, h, w = split_shape(data.path, data.train_split)
    return min(h, w)


def make_loader(data, spec: LoaderSpec) -> HeldLoader:
    """The registry's entry: the split named data.train_split of data.path, decoded (an image folder) by data.workers
    processes. Every view is made on the device, whatever augment.place says (nothing is left to decode)."""
    check_holdable(data.path, data.train_split, spec.device)
    return HeldLoader(read_split(data.path, data.train_split, data.workers, data.train_split), spec)


def open_eval_split(data, split: str, workers: int) -> HeldEvalSplit:
    return HeldEvalSplit(read_split(data.path, split, workers, data.train_split), data.image_size)


SPLITS = ("train", "val")  # what `python -m dogo.pipelines.check held PATH` reads (val: CIFAR's test batch)


def describe_split(path: str, split: str) -> str:
    """One line counting a split (the data check before a long run); DataError when it cannot be read."""
    data = read_split(path, split, len(os.sched_getaffinity(0)))
    h, w = data.images.shape[2:]
    return (f"{data.source} {split}: {len(data):,} images of {h} x {w} in {len(data.classes)} classes"
            + (f"; {len(data.skipped)} files skipped, the first: {data.skipped[0]}" if data.skipped else ""))

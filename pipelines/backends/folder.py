"""Image-folder backend: torchvision's ImageFolder layout (root/class_name/image.jpg), ImageNet's train/ and val/.

DataLoader workers fetch a batch at a time: each decodes its images once (pipelines.images), draws every view's
parameters from the images' streams (params.py) and makes the crop and flip (OpenCV, bilinear) of every view of
every group of the plan, at the group's size. Then either
- augment.place=workers: the whole recipe runs there too, per image in uint8 (pipelines/recipe/cpu.py), and the
  device only normalises; or
- augment.place=device: the worker writes each view's crops in the batch's order with each view's plan
  (recipe.device.plan), and the rest of the recipe runs batched on the device (recipe.device.DeviceRecipe).
Parameters depend on (seed, epoch, image, view) only: not on the worker, the rank or the placement.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dogo.pipelines.recipe.device import normalise
from dogo.core.errors import DataError
from dogo.pipelines.base import LoaderSpec, ShardedLoader, ViewBatch, die_with_parent
from dogo.pipelines.recipe.cpu import CpuRecipe, draw_views, write_groups
from dogo.pipelines.views import ViewPlan
from dogo.pipelines.imagefolder import ImageFolderIndex, class_folders, scan
from dogo.pipelines.images import DECODE_ERRORS, load_rgb, open_rgb, skip_line, stored_size


def _private_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed from its generator each time it is iterated, from the global
    torch RNG if it has none: that draw would shift the RNG that dropout and stochastic depth use, and a run
    resumed mid-epoch would no longer equal the run straight through. Our workers draw from their own streams."""
    return torch.Generator().manual_seed(0)


def _whole_batch(batch):
    """The DataLoader's collate: the dataset's __getitems__ already made the batch."""
    return batch


def batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor for a batch. In a DataLoader worker it is made in shared memory, as torch's
    default_collate makes its batches there: handing it to the main process then copies nothing (otherwise the
    worker copies every batch, 19 MB at 224 px, into shared memory when it is sent)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class _BatchSlots:
    """uint8 batch buffers in shared memory, made once by the loader and written over in place: each worker fills
    a free slot of its own, the main process reads it where it lies and frees it once the views are normalised.
    A fresh buffer per batch (batch_buffer) faults in every page as its worker writes it: 16 ms per 19 MB batch
    on our CPU machine, a seventh of the worker's time. A worker that finds none of its slots free (the main
    process holds them all) makes a fresh buffer as before.

    Used where the device is the CPU. On CUDA the DataLoader copies each batch into pinned memory for the
    transfer, which a slot would have to be registered for first. A slot holds one block per group of the plan
    (shapes: each group's (V, b, S, S, 3)); one busy table covers them all."""

    def __init__(self, workers: int, per_worker: int, shapes: list[tuple[int, ...]]):
        self.pixels = [torch.empty(0, dtype=torch.uint8).set_(
            torch.UntypedStorage._new_shared(workers * per_worker * int(np.prod(shape)))).view(workers, per_worker,
                                                                                               *shape)
            for shape in shapes]
        self.busy = torch.zeros((workers, per_worker), dtype=torch.uint8).share_memory_()

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape[2:]) for p in self.pixels]

    def claim(self) -> tuple[list[torch.Tensor], tuple[int, int]] | None:
        """In a worker: a free slot of its own, marked busy, its blocks and its address; None if all are busy."""
        worker = torch.utils.data.get_worker_info().id
        free = np.flatnonzero(self.busy[worker].numpy() == 0)
        if len(free) == 0:
            return None
        self.busy[worker, int(free[0])] = 1
        return self.at((worker, int(free[0]))), (worker, int(free[0]))

    def at(self, slot: tuple[int, int]) -> list[torch.Tensor]:
        return [p[slot] for p in self.pixels]

    def release(self, slot: tuple[int, int]) -> None:
        self.busy[slot] = 0

    def reset(self) -> None:
        """Every slot free: before an epoch's workers start (an epoch left early leaves its slots marked)."""
        self.busy.zero_()


class _Batches(torch.utils.data.Dataset):
    """Fetched a batch at a time (__getitems__) from a list of (epoch, index) keys: per group of the plan uint8
    views (V_g, b, S_g, S_g, 3), labels, the files skipped, and per group and view the device recipe's plan (None
    with the workers placement).

    An undecodable file is replaced by the next decodable image of the dataset and reported; nothing raises in a
    worker (a DataError there would reach the user wrapped in a worker traceback): a batch that cannot be made at
    all carries its reason, and the main process raises it."""

    def __init__(self, index: ImageFolderIndex, plan: ViewPlan, seed: int, place: str):
        self.index, self.plan, self.seed = index, plan, seed
        self.cpu_recipes = [CpuRecipe(g.recipe, g.size) for g in plan.groups] if place == "workers" else None
        self.slots: _BatchSlots | None = None  # set by the loader where the device is the CPU
        self._bad: set[int] = set()  # files this worker found undecodable: not tried again

    def __len__(self) -> int:
        return len(self.index)

    def _decode(self, i: int, skipped: list[str]) -> tuple[np.ndarray, int]:
        """Image i, or the next decodable one after it; (image, label)."""
        n = len(self.index)
        for attempt in range(n):
            j = (i + attempt) % n
            if j in self._bad:
                continue
            try:
                return load_rgb(self.index.paths[j]), int(self.index.labels[j])
            except DECODE_ERRORS as exc:
                self._bad.add(j)
                skipped.append(skip_line(self.index.paths[j], exc))
        raise DataError(f"none of the {n} files under {self.index.root} could be decoded; the first: {skipped[0]}")

    def __getitems__(self, keys: list[tuple[int, int]]):
        try:
            return self._make(keys)
        except DataError as exc:
            return {"error": str(exc)}

    def _make(self, keys: list[tuple[int, int]]) -> dict:
        epoch = keys[0][0]
        ids = np.array([i for _, i in keys], dtype=np.int64)
        skipped: list[str] = []
        decoded = [self._decode(int(i), skipped) for i in ids]
        images = [im for im, _ in decoded]
        heights = np.array([im.shape[0] for im in images])
        widths = np.array([im.shape[1] for im in images])
        shapes = [(len(g.views), len(ids), g.size, g.size, 3) for g in self.plan.groups]
        claimed = self.slots.claim() if self.slots is not None and self.slots.shapes() == shapes else None
        out, slot = claimed if claimed is not None else ([batch_buffer(shape) for shape in shapes], None)
        on_device = self.cpu_recipes is None
        drawn = [draw_views(g, self.seed, epoch, ids, heights, widths, on_device) for g in self.plan.groups]
        write_groups(images, range(len(images)), drawn, [g.size for g in self.plan.groups], self.cpu_recipes,
                     [o.numpy() for o in out])
        plans = [[view.plan for view in views] for views in drawn] if on_device else None
        labels = np.array([label for _, label in decoded], dtype=np.int64)
        return {"groups": out if slot is None else None, "slot": slot, "labels": torch.from_numpy(labels),
                "skipped": skipped, "plans": plans}


class _ShardBatches(torch.utils.data.Sampler):
    """Batch sampler over one epoch from `start`: lists of (epoch, index) for this rank."""

    def __init__(self, shard):
        self.shard, self.epoch, self.start = shard, 0, 0

    def __len__(self) -> int:
        return self.shard.steps_per_epoch - self.start

    def __iter__(self):
        for step in range(self.start, self.shard.steps_per_epoch):
            yield [(self.epoch, int(i)) for i in self.shard.indices(self.epoch, step)]


class FolderLoader(ShardedLoader):
    """Batches of views from an image folder (the ViewLoader protocol)."""

    def __init__(self, root: str | Path, spec: LoaderSpec, workers: int, labels: str = "folders"):
        self.index = scan(root, labels=labels)
        super().__init__(len(self.index), spec, where=str(root))
        self.num_classes = len(self.index.classes) or None
        self._report = self.note_skipped(self.index.skipped)  # entries the scan could not list: on the first batch
        self.recipes = self.device_recipes() if spec.recipe.place == "device" else None
        self._sampler = _ShardBatches(self.shard)
        batches = _Batches(self.index, self.plan, spec.seed, spec.recipe.place)
        prefetch = 4
        if workers > 0 and spec.device.type == "cpu":
            # per worker: the batches asked of it ahead, and the one the main process is reading
            batches.slots = _BatchSlots(workers, prefetch + 2, [(len(g.views), self.shard.local_batch, g.size,
                                                                 g.size, 3) for g in self.plan.groups])
        self._slots = batches.slots
        self._loader = torch.utils.data.DataLoader(
            batches, batch_sampler=self._sampler,
            num_workers=workers, collate_fn=_whole_batch, pin_memory=spec.device.type == "cuda",
            persistent_workers=False, prefetch_factor=prefetch if workers > 0 else None,
            generator=_private_generator(), worker_init_fn=die_with_parent)

    def batches(self, epoch: int, start_step: int) -> Iterator[ViewBatch]:
        self._sampler.epoch, self._sampler.start = epoch, start_step
        if self._slots is not None:
            self._slots.reset()
        for batch in self._loader:
            if "error" in batch:
                raise DataError(batch["error"])
            skipped, self._report = self._report + self.note_skipped(batch["skipped"]), []
            pixels = batch["groups"] if batch["slot"] is None else self._slots.at(batch["slot"])
            groups = [self.group_from_pixels(g, block, batch["plans"]) for g, block in enumerate(pixels)]
            if batch["slot"] is not None:  # its views are made (normalise and the device recipe copy)
                del pixels
                self._slots.release(batch["slot"])
            yield ViewBatch(groups, batch["labels"].to(self.device, non_blocking=True), skipped=skipped)


# ---------------------------------------------------------------------------------------------------------------
# Deterministic evaluation images: resize the short side to size / 0.875, centre crop, normalise.

class _EvalImages(torch.utils.data.Dataset):
    def __init__(self, index: ImageFolderIndex, image_size: int, positions: np.ndarray):
        self.index, self.size, self.positions = index, image_size, positions
        self.resize = int(round(image_size / 0.875))

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int):
        from PIL import Image
        j = int(self.positions[k])
        try:
            img = open_rgb(self.index.paths[j])
        except DECODE_ERRORS:
            return torch.zeros(self.size, self.size, 3, dtype=torch.uint8), -1  # label -1: left out of the metric
        scale = self.resize / min(img.width, img.height)
        w, h = max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))
        img = img.resize((w, h), Image.BILINEAR)
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()), int(self.index.labels[j])


class FolderEvalSplit:
    """One split of an image folder for evaluation (the EvalSplit protocol); decoded by `workers` processes."""

    def __init__(self, root: str | Path, image_size: int, workers: int, classes: list[str] | None = None):
        self.index = scan(root, classes)
        self.classes, self.size, self.workers = self.index.classes, image_size, workers
        self.where = str(root)

    def __len__(self) -> int:
        return len(self.index)

    def batches(self, positions: np.ndarray, batch_size: int, device: torch.device, recipe, dtype: torch.dtype,
                channels_last: bool):
        loader = torch.utils.data.DataLoader(_EvalImages(self.index, self.size, positions), batch_size=batch_size,
                                             num_workers=self.workers, pin_memory=device.type == "cuda",
                                             generator=_private_generator(), worker_init_fn=die_with_parent)
        for images, labels in loader:
            x = images.to(device, non_blocking=True).permute(0, 3, 1, 2)
            yield normalise(x, recipe, dtype, channels_last), labels.to(device, non_blocking=True)


def make_loader(data, spec: LoaderSpec) -> FolderLoader:
    """The registry's entry (dogo.pipelines.BACKENDS): the training split of data.path."""
    return FolderLoader(Path(data.path) / data.train_split, spec, workers=data.workers, labels=data.labels)


def open_eval_split(data, split: str, workers: int) -> FolderEvalSplit:
    """A split of data.path labelled by the training split's class list (a split with other class folders would
    otherwise number its classes differently): the folder, FFCV and DALI backends' evaluation images."""
    classes = class_folders(Path(data.path) / data.train_split)
    return FolderEvalSplit(Path(data.path) / split, data.image_size, workers, classes)


SPLITS = ("train", "val")  # what `python -m dogo.pipelines.check folder ROOT` reads


def typical_side(data, sample: int = 64) -> int:
    """The median shorter side of the training split's images (data.image_size=auto): the headers of an evenly
    spaced sample of `sample` images, nothing decoded."""
    index = scan(Path(data.path) / data.train_split, labels=data.labels)
    picks = np.unique(np.linspace(0, len(index) - 1, min(sample, len(index))).round().astype(int))
    sides = []
    for i in picks:
        try:
            sides.append(min(stored_size(index.paths[i])))
        except DECODE_ERRORS:
            continue  # an unreadable file is the loader's to report
    if not sides:
        raise DataError(f"data.image_size=auto: none of {len(picks)} images sampled from {index.root} could be "
                        f"opened; check the folder, or set data.image_size")
    return int(np.median(sides))


def describe_split(root: str, split: str, labels: str = "folders") -> str:
    """One line counting a split (the data check before a long run); DataError when it cannot be read."""
    index = scan(Path(root) / split, labels=labels)
    return (f"{index.root}: {len(index):,} images" + (f" in {len(index.classes):,} classes" if index.classes else
                                                      ", unlabelled")
            + (f"; {len(index.skipped)} entries skipped, the first: {index.skipped[0]}" if index.skipped else ""))

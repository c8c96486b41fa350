"""FFCV backend: two-view batches from a .beton file (`dogo convert`), augmented on the device.

Each view has its own RandomResizedCrop decoder over the one image field (FFCV decodes the JPEG or copies the raw
pixels once per view), then the uint8 crops go to the device and through the shared batched recipe
(dogo.pipelines.augment). The order is ours, not FFCV's: a TraversalOrder that serves this rank's rows of each global
batch of `Shard`, so every world size sees the same images per step (as the folder backend) and a resumed run starts
at its step. `data.order: quasi_random` keeps the global batches random but reads the file in shuffled blocks of
neighbouring samples, for machines whose memory cannot hold the file in the page cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader
from ffcv.pipeline import PipelineSpec
from ffcv.reader import Reader
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder

from dogo.pipelines.augment import BatchAugment
from dogo.pipelines.base import DataError, Shard, TwoViewBatch, check_batch_fits, view_seed


@dataclass(frozen=True)
class BlockShard(Shard):
    """Shard whose epoch permutation visits shuffled blocks of samples that lie next to each other in the file."""
    by_location: np.ndarray  # sample indices sorted by the offset of their bytes
    block: int  # samples per block

    def permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        blocks = np.array_split(self.by_location, max(1, math.ceil(len(self.by_location) / self.block)))
        return np.concatenate([rng.permutation(blocks[i]) for i in rng.permutation(len(blocks))])


class _ShardOrder(TraversalOrder):
    """FFCV traversal order serving Shard.epoch_indices from the step set by the loader."""

    def __init__(self, shard: Shard):
        self.shard, self.start_step = shard, 0

    def __call__(self, loader):
        # FFCV 1.0.2 accepts a TraversalOrder instance and calls it with the loader (ffcv/loader/loader.py)
        TraversalOrder.__init__(self, loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.shard.epoch_indices(epoch, self.start_step).astype(np.uint64)


def open_beton(path: str | Path) -> Reader:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.beton={path} does not exist; write it with `dogo convert IMAGE_FOLDER {path}`")
    try:
        reader = Reader(str(path))
    except Exception as exc:  # FFCV asserts on a bad header
        raise DataError(f"{path} is not a readable .beton ({type(exc).__name__}: {exc}); convert it again") from None
    names = reader.field_names
    if len(names) < 2 or names[:2] != ["image", "label"]:
        raise DataError(f"{path} has fields {names}; dogo expects ('image', 'label') as `dogo convert` writes them")
    return reader


class FFCVLoader:
    """The TwoViewLoader protocol over a .beton."""

    def __init__(self, beton: str | Path, *, image_size: int, global_batch: int, n_views: int, recipe, workers: int,
                 order: str, os_cache: bool, seed: int, rank: int, world_size: int, device: torch.device,
                 dtype: torch.dtype, channels_last: bool):
        reader = open_beton(beton)
        n = int(reader.num_samples)
        check_batch_fits(n, global_batch, str(beton))
        if order == "quasi_random":
            by_location = np.argsort(reader.metadata["f0"]["data_ptr"], kind="stable")
            self.shard = BlockShard(n, global_batch, rank, world_size, seed, by_location, max(16 * global_batch, 4096))
        else:
            self.shard = Shard(n, global_batch, rank, world_size, seed)
        self.steps_per_epoch = self.shard.steps_per_epoch
        self.images_per_epoch = self.steps_per_epoch * global_batch
        self.n_views, self.seed, self.device = n_views, seed, device
        self.augment = BatchAugment(recipe, image_size, dtype, channels_last)
        self._order = _ShardOrder(self.shard)
        to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
        view_ops = lambda: [RandomResizedCropRGBImageDecoder((image_size, image_size), scale=tuple(recipe.crop_scale),
                                                             ratio=tuple(recipe.crop_ratio)),
                            ToTensor(), *to_device, ToTorchImage(channels_last=True)]
        pipelines = {"image": view_ops(), "label": [IntDecoder(), ToTensor(), Squeeze(), *to_device]}
        for v in range(1, n_views):
            ops = view_ops()
            pipelines[f"image_view{v}"] = PipelineSpec("image", decoder=ops[0], transforms=ops[1:])
        self._loader = Loader(str(beton), batch_size=self.shard.local_batch, num_workers=max(1, workers),
                              os_cache=os_cache, order=self._order, seed=seed, pipelines=pipelines, drop_last=True)
        self._epoch, self._start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self._epoch, self._start = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self._start

    def __iter__(self) -> Iterator[TwoViewBatch]:
        b = self.shard.local_batch
        rows = slice(self.shard.rank * b, (self.shard.rank + 1) * b)
        epoch = self._epoch
        # FFCV asks the order for `next_epoch`'s samples when iteration starts (and then counts it up itself)
        self._order.start_step, self._loader.next_epoch = self._start, epoch
        # fields come in the writer's order (image, label), then the extra views
        for step, (first, labels, *others) in enumerate(self._loader, start=self._start):
            uint8_views = [first, *others]
            views = [self.augment(uint8_views[v].to(self.device, non_blocking=True),
                                  view_seed(self.seed, epoch, step, v), rows, self.shard.global_batch)
                     for v in range(self.n_views)]
            yield TwoViewBatch(views, labels.to(self.device, non_blocking=True).long())

"""Synthetic backend: random uint8 images made on the device, for speed tests of the engine without decoding.

The views still go through the shared recipe (dogo.pipelines.augment), so the augmentation cost is real.
"""
from __future__ import annotations

from typing import Iterator

import torch

from dogo.pipelines.augment import BatchAugment
from dogo.pipelines.base import Shard, TwoViewBatch, check_batch_fits, view_seed

NUM_CLASSES = 10
_IMAGE_STREAM = 1 << 20  # seed key of the images themselves; views use keys 0 .. n_views - 1


class SyntheticLoader:
    def __init__(self, *, num_images: int, image_size: int, global_batch: int, n_views: int, recipe, seed: int,
                 rank: int, world_size: int, device: torch.device, dtype: torch.dtype, channels_last: bool):
        check_batch_fits(num_images, global_batch, "the synthetic dataset (data.synthetic_images)")
        self.shard = Shard(num_images, global_batch, rank, world_size, seed)
        self.steps_per_epoch = self.shard.steps_per_epoch
        self.images_per_epoch = self.steps_per_epoch * global_batch
        self.size, self.n_views, self.seed, self.device = image_size, n_views, seed, device
        self.augment = BatchAugment(recipe, image_size, dtype, channels_last)
        self._epoch, self._start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self._epoch, self._start = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self._start

    def __iter__(self) -> Iterator[TwoViewBatch]:
        b = self.shard.local_batch
        rows = slice(self.shard.rank * b, (self.shard.rank + 1) * b)
        gen = torch.Generator(device=self.device)
        for step in range(self._start, self.steps_per_epoch):
            gen.manual_seed(view_seed(self.seed, self._epoch, step, _IMAGE_STREAM))
            # Drawn for the global batch so that every world size sees the same images.
            images = torch.randint(0, 256, (self.shard.global_batch, 3, self.size, self.size), generator=gen,
                                   device=self.device, dtype=torch.uint8)[rows]
            # drawn on the device too: no host data is copied in the step
            labels = torch.randint(0, NUM_CLASSES, (self.shard.global_batch,), generator=gen,
                                   device=self.device)[rows]
            views = [self.augment(images, view_seed(self.seed, self._epoch, step, v), rows, self.shard.global_batch)
                     for v in range(self.n_views)]
            yield TwoViewBatch(views, labels)

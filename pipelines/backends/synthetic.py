"""Synthetic backend: random uint8 images made on the device, for speed tests of the engine without decoding.

Each rank makes its own rows only (a rank of an 8-GPU run at 4,096 images makes 512, not 4,096), so the
synthetic ceiling measures the model. The views still go through the device recipe (dogo.pipelines.recipe.device) with
the images' own parameter streams, so the augmentation's cost is real; the pixels themselves are random, so they
need no crop or flip.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from dogo.pipelines.recipe import params as P
from dogo.pipelines.recipe.device import DeviceRecipe, plan
from dogo.pipelines.base import ShardedLoader, TwoViewBatch

NUM_CLASSES = 10


class SyntheticLoader(ShardedLoader):
    def __init__(self, *, num_images: int, image_size: int, global_batch: int, n_views: int, recipe, seed: int,
                 rank: int, world_size: int, device: torch.device, dtype: torch.dtype, channels_last: bool,
                 compile_recipe: bool = False):
        super().__init__(num_images, global_batch=global_batch, rank=rank, world_size=world_size, seed=seed,
                         where="the synthetic dataset (data.synthetic.images)")
        self.size, self.n_views, self.device, self.recipe = image_size, n_views, device, recipe
        self.device_recipe = DeviceRecipe(recipe, image_size, device, dtype, channels_last, compile=compile_recipe)

    def batches(self, epoch: int, start_step: int) -> Iterator[TwoViewBatch]:
        b = self.shard.local_batch
        gen = torch.Generator(device=self.device)
        for step in range(start_step, self.steps_per_epoch):
            ids = self.shard.indices(epoch, step)
            gen.manual_seed(int(np.random.SeedSequence([self.seed, epoch, step, self.shard.rank]).generate_state(1)[0]))
            labels = torch.randint(0, NUM_CLASSES, (b,), generator=gen, device=self.device)  # no host data
            views = []
            for v in range(self.n_views):
                images = torch.randint(0, 256, (b, 3, self.size, self.size), generator=gen, device=self.device,
                                       dtype=torch.uint8)
                views.append(self.device_recipe.apply(images, plan(P.draw(self.recipe,
                                                                          P.stream_keys(self.seed, epoch, ids, v)))))
            yield TwoViewBatch(views, labels)


def make_loader(data, *, place: str, **common) -> SyntheticLoader:
    """The registry's entry: data.synthetic.images random images; the recipe on the device."""
    return SyntheticLoader(num_images=data.synthetic.images, **common)


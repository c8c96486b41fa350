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

from dogo.pipelines.base import LoaderSpec, ShardedLoader, ViewBatch
from dogo.pipelines.recipe import params as P
from dogo.pipelines.recipe.device import plan

NUM_CLASSES = 10


class SyntheticLoader(ShardedLoader):
    def __init__(self, num_images: int, spec: LoaderSpec):
        super().__init__(num_images, spec, where="the synthetic dataset (data.synthetic.images)")
        self.recipes = self.device_recipes()

    def batches(self, epoch: int, start_step: int) -> Iterator[ViewBatch]:
        b = self.shard.local_batch
        gen = torch.Generator(device=self.device)
        for step in range(start_step, self.steps_per_epoch):
            ids = self.shard.indices(epoch, step)
            gen.manual_seed(int(np.random.SeedSequence([self.seed, epoch, step, self.shard.rank]).generate_state(1)[0]))
            labels = torch.randint(0, NUM_CLASSES, (b,), generator=gen, device=self.device)  # no host data
            groups = []
            for g, group in enumerate(self.plan.groups):  # the generator's draws in the plan's order of views
                out = self.group_output(g)
                for v, spec in enumerate(group.views):
                    images = torch.randint(0, 256, (b, 3, group.size, group.size), generator=gen,
                                           device=self.device, dtype=torch.uint8)
                    p = plan(P.draw(spec.recipe, P.stream_keys(self.seed, epoch, ids, spec.stream)))
                    self.recipes[g].apply(images, p, out=out[v * b:(v + 1) * b])
                groups.append(out)
            yield ViewBatch(groups, labels)


def make_loader(data, spec: LoaderSpec) -> SyntheticLoader:
    """The registry's entry: data.synthetic.images random images; the recipe on the device."""
    return SyntheticLoader(data.synthetic.images, spec)

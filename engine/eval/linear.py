"""Linear probes on a frozen backbone, by protocol:

- standard: the protocol of solo-learn's and lightly's tables: SGD with momentum 0.9 (lr 0.1 x batch / 256, no
  weight decay, cosine to 0) for 100 epochs on the frozen backbone's features (eval mode) of randomly cropped and
  flipped training images; top-1 and top-5 on the unaugmented val split.
- fast: a linear layer (AdamW, cosine) on cached, unaugmented features standardised with the train statistics:
  one feature pass, so minutes where standard takes an hour; its figures are not comparable with other tools'.

The standard protocol's crops come from the project's own recipe (pipelines.recipe): RandomResizedCrop's boxes
(scale 0.08-1, ratio 3/4-4/3) drawn per (seed, epoch, image) from the counter-based streams, resampled on the device
in one grid_sample, inside the evaluation image (for ImageNet-style folders: the resized centre crop). Under torchrun
each rank forwards its share of every batch and the classifier's gradients are averaged.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dogo.engine.dist.distributed import DistContext
from dogo.core.errors import DataError
from dogo.engine.eval.evaluate import extract_features, topk_accuracy
from dogo.core.precision import Precision
from dogo.pipelines import EvalSplit
from dogo.pipelines.recipe.device import resized_crops
from dogo.pipelines.recipe.params import FLIP, crop_boxes, stream_keys, uniforms

PROTOCOLS = ("standard", "fast")
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop defaults, as the tables use


def fast_probe(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
               num_classes: int, epochs: int = 100, lr: float = 1e-3, batch_size: int = 256,
               weight_decay: float = 1e-4, seed: int = 0) -> dict[str, float]:
    """A linear classifier on frozen, standardised features (train statistics); top-1 and top-5 (where there are 5
    classes) on val, in %."""
    mean, std = train_f.mean(0, keepdim=True), train_f.std(0, keepdim=True).clamp_min(1e-6)
    train_f, val_f = (train_f - mean) / std, (val_f - mean) / std
    gen = torch.Generator().manual_seed(seed)
    clf = classifier(train_f.shape[1], num_classes, seed).to(train_f.device)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, len(train_f) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        order = torch.randperm(len(train_f), generator=gen).to(train_f.device)
        for idx in order.split(batch_size):
            loss = F.cross_entropy(clf(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return topk_accuracy(clf(val_f), val_y)


def classifier(features: int, num_classes: int, seed: int) -> nn.Linear:
    """nn.Linear's own initialisation, drawn from a generator of its own: the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(features, num_classes)


def crop_and_flip(images: torch.Tensor, positions: np.ndarray, seed: int, epoch: int,
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Each image randomly cropped (RandomResizedCrop's boxes) and flipped, back to its size; the numbers of image
    i in epoch e are a pure function of (seed, e, i)."""
    size = images.shape[-1]
    keys = stream_keys(seed, epoch, positions, view=0)
    boxes = crop_boxes(keys, images.shape[-2], size, CROP_SCALE, CROP_RATIO)
    flip = uniforms(keys, FLIP, 1)[:, 0] < 0.5
    out = resized_crops(images, torch.from_numpy(boxes).to(images.device),
                        torch.from_numpy(flip).to(images.device), size)
    return out.to(images.dtype).contiguous(memory_format=memory_format)


def probe_batch(requested: int, train_images: int, world_size: int) -> tuple[int, str | None]:
    """The standard probe's global batch: `requested`, lowered where the training split holds fewer images (or to a
    multiple of the world size), with a note saying so for the result file; a DataError when none is left."""
    used = min(requested, train_images)
    used -= used % world_size
    if train_images < world_size:
        raise DataError(f"the linear probe needs at least one training image per rank: the training split has "
                        f"{train_images} for {world_size} ranks")
    if used <= 0:
        raise DataError(f"--batch-size {requested}: the linear probe takes a positive multiple of {world_size} (the "
                        f"ranks), at most {train_images} (the training images)")
    if used == requested:
        return used, None
    why = (f"is more than the {train_images} training images" if requested > train_images
           else f"does not divide over {world_size} ranks")
    return used, f"--batch-size {requested} {why}: the probe used batches of {used}"


def standard_probe(backbone: nn.Module, train: EvalSplit, val: EvalSplit, *, recipe, ctx: DistContext,
                   precision: Precision, epochs: int = 100, batch_size: int = 256, lr: float | None = None,
                   seed: int = 0) -> dict[str, float]:
    """The standard protocol (module docstring); top-1 and top-5 (where there are 5 classes) on `val`, in %.
    Deterministic for a seed, and the same on any number of ranks: rank r takes the r-th slice of every global batch
    of the epoch's permutation. `batch_size` must fit the training split (probe_batch chooses one that does)."""
    w, r = ctx.world_size, ctx.rank
    if batch_size % w:
        raise DataError(f"the probe's batch of {batch_size} (--batch-size) does not divide over {w} ranks; give a "
                        f"multiple of {w}")
    steps = len(train) // batch_size  # the last partial batch is dropped, as the tables' loaders do
    if steps == 0:
        raise DataError(f"the probe's batch of {batch_size} (--batch-size) is larger than the {len(train)} training "
                        f"images of {train.where}; give --batch-size {len(train) - len(train) % w} or less")
    local = batch_size // w
    was_training = backbone.training
    backbone.eval()
    # the backbone is frozen: the val features are the same before training the classifier as after, and an
    # unreadable val split is found before the epochs rather than after them
    val_f, val_y = extract_features(backbone, val, np.arange(len(val)), batch_size=local, recipe=recipe,
                                    ctx=ctx, precision=precision)
    clf = classifier(_feature_width(backbone, train, recipe, ctx, precision), len(train.classes), seed)
    clf.to(ctx.device)
    opt = torch.optim.SGD(clf.parameters(), lr=0.1 * batch_size / 256 if lr is None else lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(train))[:steps * batch_size]
        mine = order.reshape(steps, w, local)[:, r].reshape(-1)
        batches = train.batches(mine, local, ctx.device, recipe, precision.dtype, precision.channels_last)
        labelled = torch.zeros((), dtype=torch.int64, device=ctx.device)  # images read in this epoch, on the device
        for s, (images, y) in enumerate(batches):
            with torch.no_grad(), precision.autocast(ctx.device):
                f = backbone(crop_and_flip(images, mine[s * local:(s + 1) * local], seed, epoch,
                                           precision.memory_format)).float()
            labelled += (y >= 0).sum()
            # each rank's sum over its slice / the global batch; summed over ranks: the global batch's mean
            loss = F.cross_entropy(clf(f), y, ignore_index=-1, reduction="sum") / batch_size
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if w > 1:
                for p in clf.parameters():
                    torch.distributed.all_reduce(p.grad)
            opt.step()
            sched.step()
        if epoch == 0:
            _require_labelled(labelled, w, train)
    backbone.train(was_training)
    with torch.no_grad():
        return topk_accuracy(clf(val_f), val_y)


def _require_labelled(labelled: torch.Tensor, world_size: int, train: EvalSplit) -> None:
    """After the first epoch: a classifier trained on no readable image would report chance as a result."""
    if world_size > 1:
        torch.distributed.all_reduce(labelled)
    if int(labelled) == 0:
        raise DataError(f"{train.where}: none of the training images the probe read could be decoded; check the "
                        f"files or point data.path (data.train_split) at readable images")


@torch.no_grad()
def _feature_width(backbone, split: EvalSplit, recipe, ctx: DistContext, precision: Precision) -> int:
    images, _ = next(iter(split.batches(np.arange(1), 1, ctx.device, recipe, precision.dtype,
                                        precision.channels_last)))
    with precision.autocast(ctx.device):
        return backbone(images).shape[1]

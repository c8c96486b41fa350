"""Image-folder backend: torchvision's ImageFolder layout (root/class_name/image.jpg), ImageNet's train/ and val/.

Decoding and RandomResizedCrop run in DataLoader worker processes (PIL crops and resizes in one call); the rest of
the recipe runs batched on the device (dogo.pipelines.augment). Crop parameters are seeded per (epoch, image,
view), so they depend neither on the worker nor on the rank.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from dogo.pipelines.augment import BatchAugment, normalise
from dogo.pipelines.base import DataError, Shard, TwoViewBatch, check_batch_fits, view_seed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EXPECTED_LAYOUT = """expected the image-folder layout (as torchvision's ImageFolder and ImageNet):
  ROOT/train/<class_name>/<image>.jpg
  ROOT/val/<class_name>/<image>.jpg"""
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on a bad file
_MAX_REPLACEMENTS = 16  # undecodable files in a row before the loader gives up on a batch row


@dataclass
class ImageFolderIndex:
    root: Path
    classes: list[str]
    paths: list[str]
    labels: np.ndarray  # int64, index into `classes` (sorted class-folder names, as ImageFolder)

    def __len__(self) -> int:
        return len(self.paths)


def scan(root: str | Path) -> ImageFolderIndex:
    """List the images of one split; clear errors for a missing, empty or malformed folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; {EXPECTED_LAYOUT}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DataError(f"{root} has no class folders; {EXPECTED_LAYOUT}")
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        files = sorted(e.name for e in os.scandir(root / name)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            empty.append(name)
        paths.extend(str(root / name / f) for f in files)
        labels.extend([label] * len(files))
    if not paths:
        raise DataError(f"{root} has class folders but no images with extensions {', '.join(IMAGE_EXTENSIONS)}; "
                        f"{EXPECTED_LAYOUT}")
    if empty:
        warnings.warn(f"{root}: {len(empty)} class folder(s) have no images and contribute no samples "
                      f"(their labels are kept): {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}",
                      stacklevel=2)
    return ImageFolderIndex(root, classes, paths, np.asarray(labels, dtype=np.int64))


def random_resized_crop_box(width: int, height: int, scale, ratio, rng: np.random.Generator
                            ) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (left, top, w, h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: central crop at the nearest allowed ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def _to_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _private_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed from its generator each time it is iterated, from the global
    torch RNG if it has none: that draw would shift the RNG that dropout and stochastic depth use, and a run
    resumed mid-epoch would no longer equal the run straight through. Our workers draw from their own seeds."""
    return torch.Generator().manual_seed(0)


class TwoViewCrops(torch.utils.data.Dataset):
    """Item (epoch, index) -> (uint8 views (V, 3, S, S), label, skipped paths).

    An undecodable file is replaced by the next image of the dataset and reported, so the run goes on.
    """

    def __init__(self, index: ImageFolderIndex, image_size: int, n_views: int, recipe, seed: int):
        self.index, self.size, self.n_views, self.recipe, self.seed = index, image_size, n_views, recipe, seed

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        skipped = []
        for attempt in range(_MAX_REPLACEMENTS):
            j = (i + attempt) % len(self.index)
            try:
                img = load_rgb(self.index.paths[j])
            except DECODE_ERRORS as exc:
                skipped.append(f"{self.index.paths[j]}: {exc}")
                continue
            rng = np.random.default_rng([self.seed, epoch, int(i)])
            views = []
            for _ in range(self.n_views):
                left, top, w, h = random_resized_crop_box(img.width, img.height, self.recipe.crop_scale,
                                                          self.recipe.crop_ratio, rng)
                crop = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
                views.append(_to_chw(crop))
            return torch.stack(views), int(self.index.labels[j]), skipped
        raise DataError(f"{_MAX_REPLACEMENTS} files in a row could not be decoded, the last: {skipped[-1]}")


def _collate(items):
    views = torch.stack([v for v, _, _ in items])
    labels = torch.tensor([label for _, label, _ in items], dtype=torch.int64)
    skipped = [s for _, _, sk in items for s in sk]
    return views, labels, skipped


class _ShardBatches(torch.utils.data.Sampler):
    """Batch sampler over one epoch from `start_step`: lists of (epoch, index) for this rank."""

    def __init__(self, shard: Shard):
        self.shard, self.epoch, self.start = shard, 0, 0

    def __len__(self) -> int:
        return self.shard.steps_per_epoch - self.start

    def __iter__(self):
        for step in range(self.start, self.shard.steps_per_epoch):
            yield [(self.epoch, int(i)) for i in self.shard.indices(self.epoch, step)]


class FolderLoader:
    """Two-view batches from an image folder, augmented on `device` (the TwoViewLoader protocol)."""

    def __init__(self, root: str | Path, *, image_size: int, global_batch: int, n_views: int, recipe,
                 workers: int, seed: int, rank: int, world_size: int, device: torch.device,
                 dtype: torch.dtype, channels_last: bool):
        self.index = scan(root)
        check_batch_fits(len(self.index), global_batch, str(root))
        self.shard = Shard(len(self.index), global_batch, rank, world_size, seed)
        self.steps_per_epoch = self.shard.steps_per_epoch
        self.images_per_epoch = self.steps_per_epoch * global_batch
        self.n_views, self.seed, self.device = n_views, seed, device
        self.augment = BatchAugment(recipe, image_size, dtype, channels_last)
        self.skipped: list[str] = []  # every undecodable file met so far
        self._batches = _ShardBatches(self.shard)
        self._loader = torch.utils.data.DataLoader(
            TwoViewCrops(self.index, image_size, n_views, recipe, seed),
            batch_sampler=self._batches, num_workers=workers, collate_fn=_collate,
            pin_memory=device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None, generator=_private_generator())
        self._epoch, self._start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self._epoch, self._start = epoch, start_step
        self._batches.epoch, self._batches.start = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self._start

    def __iter__(self) -> Iterator[TwoViewBatch]:
        b = self.shard.local_batch
        rows = slice(self.shard.rank * b, (self.shard.rank + 1) * b)
        for step, (views, labels, skipped) in enumerate(self._loader, start=self._start):
            self.skipped.extend(skipped)
            views = views.to(self.device, non_blocking=True)
            out = [self.augment(views[:, v], view_seed(self.seed, self._epoch, step, v), rows,
                                self.shard.global_batch) for v in range(self.n_views)]
            yield TwoViewBatch(out, labels.to(self.device, non_blocking=True), skipped)


# ---------------------------------------------------------------------------------------------------------------
# Deterministic evaluation images: resize the short side to size / 0.875, centre crop, normalise.

class EvalImages(torch.utils.data.Dataset):
    def __init__(self, index: ImageFolderIndex, image_size: int, positions: np.ndarray):
        self.index, self.size, self.positions = index, image_size, positions
        self.resize = int(round(image_size / 0.875))

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int):
        j = int(self.positions[k])
        try:
            img = load_rgb(self.index.paths[j])
        except DECODE_ERRORS:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), -1  # label -1: left out of the metric
        scale = self.resize / min(img.width, img.height)
        w, h = max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))
        img = img.resize((w, h), Image.BILINEAR)
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        return _to_chw(img), int(self.index.labels[j])


class FolderEvalSplit:
    """One split of an image folder for evaluation (the EvalSplit protocol); decoded by `workers` processes."""

    def __init__(self, root: str | Path, image_size: int, workers: int):
        self.index = scan(root)
        self.classes, self.size, self.workers = self.index.classes, image_size, workers

    def __len__(self) -> int:
        return len(self.index)

    def batches(self, positions: np.ndarray, batch_size: int, device: torch.device, recipe, dtype: torch.dtype,
                channels_last: bool):
        loader = torch.utils.data.DataLoader(EvalImages(self.index, self.size, positions), batch_size=batch_size,
                                             num_workers=self.workers, pin_memory=device.type == "cuda",
                                             generator=_private_generator())
        for images, labels in loader:
            x = images.to(device, non_blocking=True).float().div_(255)
            yield normalise(x, recipe, dtype, channels_last), labels.to(device, non_blocking=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m dogo.pipelines.folder ROOT`: check the splits before a long run starts; exit 2 with the reason."""
    import argparse
    p = argparse.ArgumentParser(description="Check an image-folder dataset (ImageNet layout) and count it.")
    p.add_argument("root")
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    a = p.parse_args(argv)
    try:
        for split in a.splits:
            index = scan(Path(a.root) / split)
            print(f"{index.root}: {len(index):,} images in {len(index.classes):,} classes")
    except DataError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Two-view input pipeline throughput: a backend against the decode-only ceiling and the torchvision DataLoader,
all measured in one run on the same cores.

- backend: dogo's loader (folder, ffcv or dali) making two views of the full recipe at `size` px, on the device,
  in the training dtype: images/s, where every image yields two views.
- decode_only_ceiling: every image decoded once at full size by `workers` processes and nothing else, with the
  decoder the backends use (pipelines.images: libjpeg-turbo through torchvision.io for JPEGs): no loader can make
  views faster than it decodes. decode_only_pil: the same with PIL (torchvision's ImageFolder loader), the slower
  decoder most training code uses.
- torchvision: a DataLoader with `workers` processes, each image decoded once (PIL, as ImageFolder) and the full
  recipe applied twice per image with torchvision.transforms.v2, as SimCLR-style code does.
- with ffcv: also ffcv_decode_only, FFCV's own read and decode of every image (no crop): the backend's ceiling.

For CIFAR (bench_cifar): the held backend (the split on the device, views made there) against the folder backend
on the same images stored as PNG files, and against torchvision's DataLoader on the in-memory arrays (what
torchvision.datasets.CIFAR10 with v2 transforms does), all with the CIFAR recipe at 32 px.

Each figure is the median of `repeats` timed passes of `batches` batches after untimed warm-up batches; the files
are read once before timing so that all three read from the page cache.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch

from dogo.benchmarks.train_step import sync
from dogo.core.environment import environment
from dogo.engine.config import AugmentConfig, DataConfig, resolved_for
from dogo.core.precision import Precision
from dogo.pipelines import LoaderSpec, build_loader
from dogo.pipelines.base import endless
from dogo.pipelines.views import two_view_plan
from dogo.pipelines.recipe.device import blur_kernel_size
from dogo.pipelines.imagefolder import scan
from dogo.pipelines.images import load_rgb


def _rate(make_iter, batch: int, batches: int, warmup: int, repeats: int, device: torch.device) -> dict:
    rates = []
    for _ in range(repeats):
        it = make_iter()
        for _ in range(warmup):
            next(it)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        sync(device)
        rates.append(batch * batches / (time.perf_counter() - t0))
        del it
    return {"images_per_s": statistics.median(rates), "repeats": rates}


def interleaved(contenders: dict, repeats: int) -> dict:
    """{name: one timed pass -> {"images_per_s": ...}} measured in turn, `repeats` times round: per name the
    median and every pass."""
    passes = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, measure in contenders.items():
            passes[name].append(measure()["images_per_s"])
    return {name: {"images_per_s": statistics.median(r), "repeats": r} for name, r in passes.items()}


def _decode(path: str) -> int:
    return load_rgb(path).shape[1]


def _decode_pil(path: str) -> int:
    from torchvision.datasets.folder import pil_loader
    return pil_loader(path).width


def decode_ceiling(paths: list[str], workers: int, repeats: int, decode=_decode) -> dict:
    rates = []
    with mp.get_context("fork").Pool(workers) as pool:
        list(pool.imap_unordered(decode, paths[:64], chunksize=8))  # start the workers
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in pool.imap_unordered(decode, paths, chunksize=16):
                pass
            rates.append(len(paths) / (time.perf_counter() - t0))
    return {"images_per_s": statistics.median(rates), "repeats": rates}


class _TwoViewFolder(torch.utils.data.Dataset):
    """ImageFolder-style: decode once, apply the torchvision recipe twice."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from torchvision.datasets.folder import pil_loader
        img = pil_loader(self.paths[i])
        return self.transform(img), self.transform(img)


def torchvision_recipe(r: AugmentConfig, size: int):
    from torchvision.transforms import v2
    k = blur_kernel_size(size, r.blur_kernel_fraction)
    ops = [v2.RandomResizedCrop(size, scale=tuple(r.crop_scale), ratio=tuple(r.crop_ratio), antialias=True),
           v2.RandomHorizontalFlip(r.flip_p),
           v2.RandomApply([v2.ColorJitter(r.brightness, r.contrast, r.saturation, r.hue)], p=r.jitter_p),
           v2.RandomGrayscale(r.grayscale_p)]
    if r.blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma=tuple(r.blur_sigma))], p=r.blur_p))
    if r.solarize_p > 0:
        ops.append(v2.RandomSolarize(128, p=r.solarize_p))
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(r.mean), list(r.std))]
    return v2.Compose(ops)


def _torchvision_iter(paths, recipe, size, batch, workers, seed):
    def make():
        g = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(_TwoViewFolder(paths, torchvision_recipe(recipe, size)),
                                             batch_size=batch, shuffle=True, generator=g, num_workers=workers,
                                             drop_last=True, prefetch_factor=4, persistent_workers=False)
        return iter(loader)
    return make


def _spec(recipe, size: int, batch: int, device: torch.device, precision=None) -> LoaderSpec:
    """Two views of `size` per image, seed 0, one rank: what the pipeline benchmarks time."""
    return LoaderSpec(plan=two_view_plan(size, recipe), recipe=recipe, global_batch=batch, seed=0, device=device,
                      **({"dtype": precision.dtype, "channels_last": precision.channels_last} if precision else {}))


def _backend_iter(backend: str, root: Path, beton: str, recipe, size, batch, workers, device, precision):
    data = DataConfig(backend=backend, path=str(root.parent), train_split=root.name,
                      image_size=size, batch_size=batch, workers=workers)
    data.ffcv.beton = beton
    return lambda: endless(build_loader(data, _spec(recipe, size, batch, device, precision)))


def _ffcv_decode_iter(beton: str, recipe, size, batch, workers, device):
    """FFCV's read and decode alone (whole images, no crop): the FFCV backend's own ceiling."""
    def make():
        from dogo.pipelines.backends.ffcv_loader import FFCVLoader
        device_recipe = dataclasses.replace(recipe, place="device")
        loader = FFCVLoader(beton, _spec(device_recipe, size, batch, device), workers=workers)
        return endless(loader, lambda l, epoch: l.decoded_batches(epoch, 0))
    return make


def bench_pipeline(backend: str, root: Path, beton: str, size: int, batch: int, batches: int, warmup: int,
                   repeats: int, workers: int, device: torch.device, placement: str = "auto", log=print) -> dict:
    from dogo.benchmarks.traffic import recipe_traffic
    cfg = resolved_for(device, augment=AugmentConfig(place=placement))  # the ImageNet recipe: blur p=0.5 at 224 px
    recipe, precision = cfg.augment, Precision.of(cfg)
    placement = recipe.place if backend in ("folder", "ffcv") else "own" if backend == "dali" else "device"
    paths = scan(root).paths
    for p in paths:  # into the page cache
        Path(p).read_bytes()
    result = {"benchmark": "pipeline", "backend": backend, "placement": placement, "data": str(root),
              "images": len(paths), "what": "images per second, each yielding two views of the full recipe at size px",
              "size": size, "batch": batch, "timed_batches": batches, "warmup_batches": warmup, "workers": workers,
              "device": str(device), "dtype": str(precision.dtype), "recipe": vars(recipe)}
    if beton:
        result["beton"] = beton
    if placement == "device":
        work = torch.float16 if device.type == "cuda" else torch.float32
        result["device_recipe_traffic"] = recipe_traffic(recipe, size, batch, work, precision.dtype)
        result["bytes_per_image_per_view"] = result["device_recipe_traffic"]["bytes_per_image_per_view"]
    # every contender once per pass, passes repeated: a machine whose speed drifts (a shared host) moves all of
    # them alike, and the ratios stay side by side
    contenders = {
        "decode_only_ceiling": lambda: decode_ceiling(paths, workers, 1, _decode),
        "decode_only_pil": lambda: decode_ceiling(paths, workers, 1, _decode_pil),
        "torchvision": lambda: _rate(_torchvision_iter(paths, recipe, size, batch, workers, 0), batch, batches,
                                     warmup, 1, torch.device("cpu")),
        "backend_two_views": lambda: _rate(_backend_iter(backend, root, beton, recipe, size, batch, workers,
                                                         device, precision), batch, batches, warmup, 1, device),
    }
    if backend == "ffcv":  # in the same passes: FFCV decodes with its own libjpeg-turbo binding
        contenders["ffcv_decode_only"] = lambda: _rate(_ffcv_decode_iter(beton, recipe, size, batch, workers,
                                                                         device), batch, batches, warmup, 1, device)
    log(f"decode only (our decoder, PIL), torchvision DataLoader with v2 transforms, dogo {backend} backend with "
        f"the recipe placed on {placement}: {repeats} interleaved passes ...")
    result.update(interleaved(contenders, repeats))
    for key in contenders:
        log(f"  {key}: {result[key]['images_per_s']:.1f} images/s")
    rate = result["backend_two_views"]["images_per_s"]
    result["ratio_to_torchvision"] = rate / result["torchvision"]["images_per_s"]
    result["ratio_to_decode_ceiling"] = rate / result["decode_only_ceiling"]["images_per_s"]
    result["ratio_to_pil_decode"] = rate / result["decode_only_pil"]["images_per_s"]
    if backend == "ffcv":
        result["ratio_to_ffcv_decode"] = rate / result["ffcv_decode_only"]["images_per_s"]
        result["goal"] = ">= 10x torchvision"
        result["goal_met"] = result["ratio_to_torchvision"] >= 10
    else:
        result["goal"] = ">= 10x torchvision and >= 0.5 x the decode-only ceiling (our loader's decoder)"
        result["goal_met"] = result["ratio_to_torchvision"] >= 10 and result["ratio_to_decode_ceiling"] >= 0.5
    result["environment"] = environment(device)
    return result


class _TwoViewArrays(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10-style: images in memory, the torchvision recipe applied twice per image."""

    def __init__(self, images, transform):
        from PIL import Image
        self.images = [Image.fromarray(img.transpose(1, 2, 0)) for img in images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.transform(self.images[i])


def cifar_recipe() -> AugmentConfig:
    """The recipe of configs/cifar10_*.yaml: colour distortion 1, no blur."""
    return AugmentConfig(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_p=0.0,
                         mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


def _as_png_folder(images, labels, classes, root: Path) -> Path:
    from PIL import Image
    for i, (img, y) in enumerate(zip(images, labels)):
        folder = root / "train" / classes[y]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i:06d}.png")
    return root / "train"


def bench_cifar(path: Path, size: int, batch: int, batches: int, warmup: int, repeats: int, workers: int,
                device: torch.device, log=print) -> dict:
    import tempfile
    from dogo.pipelines.heldsplit import read_split
    cfg = resolved_for(device, augment=cifar_recipe())
    recipe, precision = cfg.augment, Precision.of(cfg)
    data = read_split(path, "train", workers)
    result = {"benchmark": "pipeline", "backend": "held", "data": str(data.source), "images": len(data),
              "what": "images per second, each yielding two views of the CIFAR recipe at size px",
              "size": size, "batch": batch, "timed_batches": batches, "warmup_batches": warmup, "workers": workers,
              "device": str(device), "dtype": str(precision.dtype), "recipe": vars(recipe)}
    config = DataConfig(backend="held", path=str(path), image_size=size, batch_size=batch, workers=0)

    def torchvision_iter():
        g = torch.Generator().manual_seed(0)
        return iter(torch.utils.data.DataLoader(_TwoViewArrays(data.images, torchvision_recipe(recipe, size)),
                                                batch_size=batch, shuffle=True, generator=g, num_workers=workers,
                                                drop_last=True, prefetch_factor=4, persistent_workers=False))
    with tempfile.TemporaryDirectory() as tmp:
        root = _as_png_folder(data.images, data.labels, data.classes, Path(tmp))
        contenders = {
            "backend_two_views": lambda: _rate(
                lambda: endless(build_loader(config, _spec(recipe, size, batch, device, precision))),
                batch, batches, warmup, 1, device),
            "folder_two_views": lambda: _rate(_backend_iter("folder", root, "", recipe, size, batch, workers,
                                                            device, precision), batch, batches, warmup, 1, device),
            "torchvision": lambda: _rate(torchvision_iter, batch, batches, warmup, 1, torch.device("cpu")),
        }
        log(f"dogo held backend (the split on the device), the folder backend on the same images as PNG files and "
            f"torchvision's DataLoader on the arrays ({workers} workers each): {repeats} interleaved passes ...")
        result.update(interleaved(contenders, repeats))
    for key in contenders:
        log(f"  {key}: {result[key]['images_per_s']:.1f} images/s")
    rate = result["backend_two_views"]["images_per_s"]
    result["ratio_to_folder"] = rate / result["folder_two_views"]["images_per_s"]
    result["ratio_to_torchvision"] = rate / result["torchvision"]["images_per_s"]
    result["environment"] = environment(device)
    return result


def summary(result: dict, backend: str, size: int) -> str:
    """The line `dogo bench pipeline` prints for a result."""
    if backend == "cifar":
        return (f"cifar: {result['backend_two_views']['images_per_s']:.1f} images/s (two views at {size} px) "
                f"= {result['ratio_to_folder']:.1f}x the folder backend, {result['ratio_to_torchvision']:.1f}x "
                f"torchvision")
    return (f"{backend} ({result['placement']}): {result['backend_two_views']['images_per_s']:.1f} images/s (two "
            f"views at {size} px) = {result['ratio_to_torchvision']:.2f}x torchvision, "
            f"{result['ratio_to_decode_ceiling']:.2f}x the decode-only ceiling; goal met: {result['goal_met']}")

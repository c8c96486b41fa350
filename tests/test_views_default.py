"""Today's views pinned: for a seed, the first batch of every backend (held, synthetic, folder with the recipe on the
device or in 0 and 2 workers, ffcv) equals a per-view reference built from the public pieces: the image's stream of
(seed, epoch, image, view) for views 0..3 (DoGo's four included), its parameters and crop box, the crop and flip,
and the recipe where the backend runs it. Any change to how views are numbered, drawn or made fails here."""
import numpy as np
import pytest
import torch

from dogo.engine.config import AugmentConfig, DataConfig
from dogo.pipelines import build_loader
from dogo.pipelines.base import Shard
from dogo.pipelines.heldsplit import read_split
from dogo.pipelines.imagefolder import scan
from dogo.pipelines.images import load_rgb
from dogo.pipelines.recipe import params as P
from dogo.pipelines.recipe.cpu import CpuRecipe, crop_and_flip
from dogo.pipelines.recipe.device import DeviceRecipe, normalise, plan, resized_crops
from tests.test_held import write_cifar10

CPU = torch.device("cpu")
SEED, BATCH, VIEWS = 7, 8, 4
RECIPE = dict(blur_p=0.5, solarize_p=0.2)  # every stage of the recipe can act


def _first_batch(data: DataConfig, place: str, size: int) -> list[torch.Tensor]:
    """The loader's first batch at SEED as a list of VIEWS view tensors, each (b, 3, S, S)."""
    loader = build_loader(data, AugmentConfig(place=place, **RECIPE), n_views=VIEWS, seed=SEED, rank=0,
                          world_size=1, device=CPU, dtype=torch.float32, channels_last=False)
    return next(iter(loader)).views


def _params(ids, view, heights, widths):
    keys = P.stream_keys(SEED, 0, ids, view)
    recipe = AugmentConfig(**RECIPE)
    return P.draw(recipe, keys), P.crop_boxes(keys, heights, widths, recipe.crop_scale, recipe.crop_ratio)


def _device_views(crops_of_view, size):
    """Each view's uint8 crops (b, 3, S, S) through the device recipe, with that view's plan."""
    recipe = DeviceRecipe(AugmentConfig(**RECIPE), size, CPU, torch.float32, False)
    return [recipe.apply(crops, plan(p)) for crops, p in crops_of_view]


def _first_ids(n: int) -> np.ndarray:
    return Shard(n, BATCH, 0, 1, SEED).indices(0, 0)


def _assert_views(got, want):
    assert len(got) == len(want) == VIEWS
    for v, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"view {v} differs from the reference"


def test_held_views(tmp_path):
    cifar = write_cifar10(tmp_path)
    split = read_split(cifar, "train")
    ids = _first_ids(len(split))
    images = torch.from_numpy(split.images[ids])
    crops = []
    for v in range(VIEWS):
        p, boxes = _params(ids, v, 32, 32)
        crops.append((resized_crops(images, torch.from_numpy(boxes), torch.from_numpy(p.flip), 32), p))
    data = DataConfig(backend="held", path=str(cifar), image_size=32, batch_size=BATCH, workers=1)
    _assert_views(_first_batch(data, "device", 32), _device_views(crops, 32))


def test_synthetic_views():
    data = DataConfig(backend="synthetic", image_size=16, batch_size=BATCH)
    ids = _first_ids(data.synthetic.images)
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([SEED, 0, 0, 0]).generate_state(1)[0]))
    torch.randint(0, 10, (BATCH,), generator=gen)  # the labels come first
    crops = [(torch.randint(0, 256, (BATCH, 3, 16, 16), generator=gen, dtype=torch.uint8),
              _params(ids, v, 16, 16)[0]) for v in range(VIEWS)]
    _assert_views(_first_batch(data, "device", 16), _device_views(crops, 16))


def _folder_reference(root, place: str, size: int = 16) -> list[torch.Tensor]:
    """Decode each image of the first batch, then per view and image the crop and flip (and, workers placement, the
    CPU recipe), then the device recipe or normalisation."""
    index = scan(root)
    ids = _first_ids(len(index))
    images = [load_rgb(index.paths[i]) for i in ids]
    heights, widths = [im.shape[0] for im in images], [im.shape[1] for im in images]
    cpu = CpuRecipe(AugmentConfig(**RECIPE), size)
    views, crops = [], []
    for v in range(VIEWS):
        p, boxes = _params(ids, v, heights, widths)
        pixels = np.stack([crop_and_flip(im, boxes[k], bool(p.flip[k]), size) for k, im in enumerate(images)])
        if place == "workers":
            for k in range(len(ids)):
                cpu.colour(pixels[k].copy(), p, k, pixels[k])
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
            views.append(normalise(x, AugmentConfig(**RECIPE), torch.float32, False))
        else:
            crops.append((torch.from_numpy(pixels).permute(0, 3, 1, 2), p))
    return views if place == "workers" else _device_views(crops, size)


@pytest.mark.parametrize("place, workers", [("device", 0), ("workers", 0), ("workers", 2)])
def test_folder_views(shapes, place, workers):
    data = DataConfig(backend="folder", path=str(shapes), image_size=16, batch_size=BATCH, workers=workers)
    _assert_views(_first_batch(data, place, 16), _folder_reference(shapes / "train", place))


@pytest.mark.parametrize("place", ["device", "workers"])
def test_ffcv_views(shapes, tmp_path, place):
    """On a lossless .beton the images are the folder's pixels: the folder's reference."""
    pytest.importorskip("ffcv", reason="the ffcv extra is not installed")
    from dogo.pipelines.convert import ConvertOptions, convert
    beton = tmp_path / "train.beton"
    convert(shapes / "train", beton, ConvertOptions(num_workers=1, write_mode="raw"), log=None)
    data = DataConfig(backend="ffcv", path=str(shapes), image_size=16, batch_size=BATCH, workers=1)
    data.ffcv.beton = str(beton)
    _assert_views(_first_batch(data, place, 16), _folder_reference(shapes / "train", place))

"""Every loader makes the plan of views, pinned against a per-view reference built from the public pieces: for each
view of each group, the image's stream of (seed, epoch, image, view number) and the view's own recipe, its
parameters and crop box, the crop and flip at the group's size, and the recipe where the backend runs it (per view,
with the view's own recipe: the loaders' one recipe per group must give the same bits).

Two plans: today's two views of one size for DoGo's two sets (streams 0..3: any change to how views are numbered,
drawn or made fails here), and a multi-crop plan of 2 large views with per-view overrides + 3 small ones, in two
sets. Backends: held, synthetic, folder with the recipe on the device or in 0 and 2 workers, ffcv."""
import numpy as np
import pytest
import torch

from dogo.engine.config import AugmentConfig, DataConfig
from dogo.engine.config.schema import RecipeOverrides, ViewGroup
from dogo.pipelines import LoaderSpec, build_loader
from dogo.pipelines.base import Shard
from dogo.pipelines.heldsplit import read_split
from dogo.pipelines.imagefolder import scan
from dogo.pipelines.images import load_rgb
from dogo.pipelines.recipe import params as P
from dogo.pipelines.recipe.cpu import CpuRecipe, crop_and_flip
from dogo.pipelines.recipe.device import DeviceRecipe, normalise, plan, resized_crops
from dogo.pipelines.views import plan_of, two_view_plan
from tests.test_held import write_cifar10

CPU = torch.device("cpu")
SEED, BATCH = 7, 8
RECIPE = dict(blur_p=0.5, solarize_p=0.2)  # every stage of the recipe can act
PLANS = ["default", "multi"]


def _plan(name: str, size: int, place: str):
    recipe = AugmentConfig(place=place, **RECIPE)
    if name == "default":
        the_plan = two_view_plan(size, recipe, sets=2)
        assert [v.stream for v in the_plan.groups[0].views] == [0, 1, 2, 3]  # DoGo's four views, as ever
        return the_plan
    views = {"global": ViewGroup(count=2, view_recipe={"0": RecipeOverrides(blur_p=1.0, solarize_p=0.0),
                                                       "1": RecipeOverrides(blur_p=0.0, grayscale_p=1.0)}),
             "local": ViewGroup(count=3, size=size // 2, recipe=RecipeOverrides(crop_scale=(0.05, 0.4)))}
    return plan_of(recipe, views, size, sets=2)


def _first_batch(data: DataConfig, the_plan):
    spec = LoaderSpec(plan=the_plan, recipe=the_plan.groups[0].recipe, global_batch=BATCH, seed=SEED)
    return next(iter(build_loader(data, spec)))


def _params(ids, spec, heights, widths):
    keys = P.stream_keys(SEED, 0, ids, spec.stream)
    r = spec.recipe
    return P.draw(r, keys), P.crop_boxes(keys, heights, widths, r.crop_scale, r.crop_ratio)


def _on_device(crops: torch.Tensor, spec, p, size: int) -> torch.Tensor:
    """A view's uint8 crops (b, 3, S, S) through the device recipe of the view's own recipe, with its plan."""
    return DeviceRecipe(spec.recipe, size, CPU, torch.float32, False).apply(crops, plan(p))


def _first_ids(n: int) -> np.ndarray:
    return Shard(n, BATCH, 0, 1, SEED).indices(0, 0)


def _assert_groups(batch, want: list[torch.Tensor]):
    assert len(batch.groups) == len(want)
    for g, (a, b) in enumerate(zip(batch.groups, want)):
        assert a.shape == b.shape, (g, a.shape, b.shape)
        for v, (x, y) in enumerate(zip(a.split(BATCH), b.split(BATCH))):
            assert torch.equal(x, y), f"group {g}, view {v} differs from the reference"


@pytest.mark.parametrize("plan_name", PLANS)
def test_held_views(tmp_path, plan_name):
    cifar = write_cifar10(tmp_path)
    split = read_split(cifar, "train")
    ids = _first_ids(len(split))
    images = torch.from_numpy(split.images[ids])
    the_plan = _plan(plan_name, 32, "device")
    want = []
    for group in the_plan.groups:
        views = []
        for spec in group.views:
            p, boxes = _params(ids, spec, 32, 32)
            crops = resized_crops(images, torch.from_numpy(boxes), torch.from_numpy(p.flip), group.size)
            views.append(_on_device(crops, spec, p, group.size))
        want.append(torch.cat(views))
    data = DataConfig(backend="held", path=str(cifar), image_size=32, batch_size=BATCH, workers=1)
    _assert_groups(_first_batch(data, the_plan), want)


@pytest.mark.parametrize("plan_name", PLANS)
def test_synthetic_views(plan_name):
    data = DataConfig(backend="synthetic", image_size=16, batch_size=BATCH)
    ids = _first_ids(data.synthetic.images)
    the_plan = _plan(plan_name, 16, "device")
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([SEED, 0, 0, 0]).generate_state(1)[0]))
    torch.randint(0, 10, (BATCH,), generator=gen)  # the labels come first
    want = []
    for group in the_plan.groups:  # the generator's draws in the plan's order of views
        views = []
        for spec in group.views:
            pixels = torch.randint(0, 256, (BATCH, 3, group.size, group.size), generator=gen, dtype=torch.uint8)
            views.append(_on_device(pixels, spec, _params(ids, spec, 16, 16)[0], group.size))
        want.append(torch.cat(views))
    _assert_groups(_first_batch(data, the_plan), want)


def _folder_reference(root, the_plan, place: str) -> list[torch.Tensor]:
    """Decode each image of the first batch, then per group, view and image the crop and flip (and, workers
    placement, the CPU recipe), then the device recipe or normalisation."""
    index = scan(root)
    ids = _first_ids(len(index))
    images = [load_rgb(index.paths[i]) for i in ids]
    heights, widths = [im.shape[0] for im in images], [im.shape[1] for im in images]
    want = []
    for group in the_plan.groups:
        cpu = CpuRecipe(group.recipe, group.size)
        views = []
        for spec in group.views:
            p, boxes = _params(ids, spec, heights, widths)
            pixels = np.stack([crop_and_flip(im, boxes[k], bool(p.flip[k]), group.size)
                               for k, im in enumerate(images)])
            if place == "workers":
                for k in range(len(ids)):
                    cpu.colour(pixels[k].copy(), p, k, pixels[k])
                x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
                views.append(normalise(x, AugmentConfig(**RECIPE), torch.float32, False))
            else:
                views.append(_on_device(torch.from_numpy(pixels).permute(0, 3, 1, 2), spec, p, group.size))
        want.append(torch.cat(views))
    return want


@pytest.mark.parametrize("plan_name", PLANS)
@pytest.mark.parametrize("place, workers", [("device", 0), ("workers", 0), ("workers", 2)])
def test_folder_views(shapes, place, workers, plan_name):
    data = DataConfig(backend="folder", path=str(shapes), image_size=16, batch_size=BATCH, workers=workers)
    the_plan = _plan(plan_name, 16, place)
    _assert_groups(_first_batch(data, the_plan), _folder_reference(shapes / "train", the_plan, place))


@pytest.mark.parametrize("plan_name", PLANS)
@pytest.mark.parametrize("place", ["device", "workers"])
def test_ffcv_views(shapes, tmp_path, place, plan_name):
    """On a lossless .beton the images are the folder's pixels: the folder's reference."""
    pytest.importorskip("ffcv", reason="the ffcv extra is not installed")
    from dogo.pipelines.convert import ConvertOptions, convert
    beton = tmp_path / "train.beton"
    convert(shapes / "train", beton, ConvertOptions(num_workers=1, write_mode="raw"), log=None)
    data = DataConfig(backend="ffcv", path=str(shapes), image_size=16, batch_size=BATCH, workers=1)
    data.ffcv.beton = str(beton)
    the_plan = _plan(plan_name, 16, place)
    _assert_groups(_first_batch(data, the_plan), _folder_reference(shapes / "train", the_plan, place))


def _multi_spec(place: str, size: int = 16, rank: int = 0, world: int = 1) -> LoaderSpec:
    the_plan = _plan("multi", size, place)
    return LoaderSpec(plan=the_plan, recipe=the_plan.groups[0].recipe, global_batch=BATCH, seed=SEED, rank=rank,
                      world_size=world)


def test_folder_decodes_each_image_once_for_every_group(shapes, monkeypatch):
    """Ten views of each image in two sizes, from one decode of it."""
    from dogo.pipelines.backends import folder
    calls = []
    real = folder.load_rgb
    monkeypatch.setattr(folder, "load_rgb", lambda path, *a, **k: (calls.append(path), real(path, *a, **k))[1])
    loader = folder.FolderLoader(shapes / "train", _multi_spec("workers"), workers=0)
    batches = iter(loader)
    for step in (1, 2):
        batch = next(batches)
        assert [g.shape for g in batch.groups] == [(4 * BATCH, 3, 16, 16), (6 * BATCH, 3, 8, 8)]
        assert len(calls) == step * BATCH


@pytest.mark.parametrize("place", ["device", "workers"])
def test_worker_slots_hold_every_group(shapes, place):
    """With worker processes on a CPU device each batch's groups come through one shared slot: an epoch equals the
    loader without workers, batch for batch, every group bit for bit."""
    from dogo.pipelines.backends.folder import FolderLoader
    plain = list(FolderLoader(shapes / "train", _multi_spec(place), workers=0))
    loader = FolderLoader(shapes / "train", _multi_spec(place), workers=2)
    released = []
    release = loader._slots.release
    loader._slots.release = lambda slot: (released.append(slot), release(slot))
    made = list(loader)
    assert len(made) == len(plain) == len(released) == 10
    for a, b in zip(made, plain):
        assert torch.equal(a.labels, b.labels)
        assert all(torch.equal(x, y) for x, y in zip(a.groups, b.groups))


def test_two_ranks_make_the_plan_of_one_and_resume_skips_steps(tmp_path):
    from dogo.pipelines.backends.held import HeldLoader
    split = read_split(write_cifar10(tmp_path), "train")
    whole = list(HeldLoader(split, _multi_spec("device", 32)))
    halves = [list(HeldLoader(split, _multi_spec("device", 32, rank=r, world=2))) for r in (0, 1)]
    b = BATCH // 2
    for step, batch in enumerate(whole):
        for g, group in enumerate(batch.groups):
            for v, view in enumerate(group.split(BATCH)):  # rank r holds rows r*b..(r+1)*b of every view
                joined = torch.cat([h[step].groups[g][v * b:(v + 1) * b] for h in halves])
                torch.testing.assert_close(joined, view, atol=1e-5, rtol=0)  # oneDNN picks kernels by shape
    resumed = HeldLoader(split, _multi_spec("device", 32))
    resumed.set_epoch(0, start_step=3)
    for a, b_ in zip(resumed, whole[3:]):
        assert all(torch.equal(x, y) for x, y in zip(a.groups, b_.groups)) and torch.equal(a.labels, b_.labels)

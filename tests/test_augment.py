"""The recipe: its parameter streams, the device recipe and the CPU-worker recipe against
torchvision.transforms.v2.functional applied image by image, and the device recipe's memory traffic."""
import math

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from dogo.benchmarks.traffic import recipe_traffic
from dogo.engine.config import AugmentConfig
from dogo.pipelines.recipe import device as A, params as P
from dogo.pipelines.recipe.cpu import CpuRecipe, blur_taps
from dogo.pipelines.recipe.cpu import crop_and_flip

STRONG = AugmentConfig(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, grayscale_p=0.3, solarize_p=0.3)


def _uint8_images(n, size, seed):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def torchvision_recipe(image: torch.Tensor, p: P.ViewParams, i: int, recipe, size: int) -> torch.Tensor:
    """Image i through torchvision's float ops in its own jitter order, on the 0..255 scale."""
    im = image.float() / 255
    ops = [lambda x: TF.adjust_brightness(x, float(p.factors[i, 0])),
           lambda x: TF.adjust_contrast(x, float(p.factors[i, 1])),
           lambda x: TF.adjust_saturation(x, float(p.factors[i, 2])),
           lambda x: TF.adjust_hue(x, float(p.factors[i, 3]))]
    if p.jitter[i]:
        for k in p.order[i]:
            im = ops[k](im)
    if p.gray[i]:
        im = TF.rgb_to_grayscale(im, num_output_channels=3)
    if p.blur[i]:
        k, s = A.blur_kernel_size(size, recipe.blur_kernel_fraction), float(p.sigma[i])
        im = TF.gaussian_blur(im, [k, k], [s, s])
    if p.solarize[i]:
        im = TF.solarize(im, threshold=0.5)
    return im * 255


def _device_views(images, p, recipe, size, work):
    """The device recipe as the backends call it, undone to the 0..255 scale."""
    rec = A.DeviceRecipe(recipe, size, torch.device("cpu"), torch.float32, False, work=work)
    out = rec.apply(images, rec.plan(p))
    mean, std = torch.tensor(recipe.mean).view(1, 3, 1, 1), torch.tensor(recipe.std).view(1, 3, 1, 1)
    return (out * std + mean) * 255


def test_parameters_are_a_function_of_seed_epoch_image_and_view_only():
    keys = P.stream_keys(5, 2, np.arange(100), 1)
    whole = P.draw(STRONG, keys)
    part = P.draw(STRONG, P.stream_keys(5, 2, np.arange(40, 60), 1))  # another batch holding images 40..59
    np.testing.assert_array_equal(part.factors, whole.factors[40:60])
    np.testing.assert_array_equal(part.order, whole.order[40:60])
    for other in (P.stream_keys(6, 2, np.arange(100), 1), P.stream_keys(5, 3, np.arange(100), 1),
                  P.stream_keys(5, 2, np.arange(100), 0)):
        assert not np.array_equal(P.draw(STRONG, other).factors, whole.factors)
    assert len(np.unique(keys)) == 100


def test_drawn_parameters_follow_the_recipe_over_thousands_of_images():
    """Rates and ranges of the per-image draws, within 4.5 standard errors over 8,000 images. Both placements draw
    with this function, so this holds for both."""
    recipe = AugmentConfig(solarize_p=0.1)
    n = 8000
    p = P.draw(recipe, P.stream_keys(123, 0, np.arange(n), 0))
    for mask, rate in ((p.flip, recipe.flip_p), (p.jitter, recipe.jitter_p), (p.gray, recipe.grayscale_p),
                       (p.blur, recipe.blur_p), (p.solarize, recipe.solarize_p)):
        assert abs(mask.mean() - rate) < 4.5 * (rate * (1 - rate) / n) ** 0.5
    for col, strength in enumerate((recipe.brightness, recipe.contrast, recipe.saturation)):
        lo, hi = 1 - strength, 1 + strength
        f = p.factors[:, col]
        assert f.min() >= lo and f.max() <= hi and f.min() < lo + 0.01 and f.max() > hi - 0.01
        assert abs(f.mean() - 1) < 4.5 * (2 * strength) / (12 * n) ** 0.5  # uniform: sd = width / sqrt(12)
    hue = p.factors[:, 3]
    assert hue.min() >= -recipe.hue and hue.max() <= recipe.hue and np.abs(hue).max() > 0.99 * recipe.hue
    assert p.sigma.min() >= recipe.blur_sigma[0] and p.sigma.max() <= recipe.blur_sigma[1]
    assert (np.sort(p.order, axis=1) == np.arange(4)).all()  # each order is a permutation ...
    for slot in range(4):  # ... with each op equally likely at each slot
        share = np.bincount(p.order[:, slot], minlength=4) / n
        assert np.abs(share - 0.25).max() < 4.5 * (0.25 * 0.75 / n) ** 0.5
    assert P.draw(AugmentConfig(brightness=1.5), P.stream_keys(0, 0, np.arange(500), 0)).factors[:, 0].min() >= 0


def _reference_crop_box(width, height, scale, ratio, u):
    """torchvision's RandomResizedCrop.get_params, written as it is, reading its uniforms from u (10, 4)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[t, 0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[t, 1])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[t, 3] * (width - w + 1)), int(u[t, 2] * (height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.9, 1.0), (0.2, 5.0))])
def test_crop_boxes_follow_torchvisions_rule(scale, ratio):
    """The same uniforms through torchvision's loop and through our vectorised draw give the same boxes, for images
    of different sizes; the second recipe sends many images to the fallback."""
    n = 2000
    keys = P.stream_keys(11, 0, np.arange(n), 0)
    heights, widths = 20 + np.arange(n) % 41, 30 + np.arange(n) % 23
    boxes = P.crop_boxes(keys, heights, widths, scale, ratio)
    u = P.uniforms(keys, P.CROP, 4 * P.CROP_TRIES).reshape(n, P.CROP_TRIES, 4)
    expected = np.array([_reference_crop_box(widths[i], heights[i], scale, ratio, u[i]) for i in range(n)])
    np.testing.assert_array_equal(boxes, expected)


@pytest.mark.parametrize("size", [17, 32])
def test_device_recipe_equals_torchvision_image_by_image(size):
    """Every op on (brightness, contrast, saturation, hue in each image's order, grey, blur, solarise): in float32
    the device recipe is torchvision's float pipeline to float rounding; in float16 (what a GPU runs) within one
    grey level."""
    n = 96
    images = _uint8_images(n, size, seed=1)
    p = P.draw(STRONG, P.stream_keys(3, 1, np.arange(n), 0))
    assert p.jitter.any() and p.gray.any() and p.blur.any() and p.solarize.any() and (~p.jitter).any()
    want = torch.stack([torchvision_recipe(images[i], p, i, STRONG, size) for i in range(n)])
    torch.testing.assert_close(_device_views(images, p, STRONG, size, torch.float32), want, atol=3e-3, rtol=0)
    assert (_device_views(images, p, STRONG, size, torch.float16) - want).abs().max() <= 1.0


def test_hue_equals_torchvision_on_edge_colours():
    """Grey pixels (no hue), g == b (the seam between the hexagon's halves), pure primaries and secondaries, every
    shift sign."""
    colours = torch.tensor([[0, 0, 0], [255, 255, 255], [90, 90, 90], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                            [255, 255, 0], [0, 255, 255], [255, 0, 255], [200, 50, 50], [10, 200, 200],
                            [1, 0, 0], [128, 64, 64], [64, 128, 128]], dtype=torch.float32)
    x = colours.T.reshape(1, 3, 1, -1).expand(9, -1, 4, -1).contiguous()
    shifts = torch.linspace(-0.5, 0.5, 9)
    got = A.hue(x, shifts)
    want = torch.stack([TF.adjust_hue(im / 255, float(s)) * 255 for im, s in zip(x, shifts)])
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_recipe_when_no_image_or_every_image_takes_each_op(p):
    """Empty runs and subsets (every op configured, none drawn) and full ones both work."""
    recipe = AugmentConfig(jitter_p=p, grayscale_p=p, blur_p=p, solarize_p=p, flip_p=p, mean=(0, 0, 0),
                           std=(1, 1, 1))
    images = _uint8_images(6, 16, seed=9)
    params = P.draw(recipe, P.stream_keys(0, 0, np.arange(6), 0))
    out = _device_views(images, params, recipe, 16, torch.float32)
    if p == 0:  # nothing applied: only the normalisation
        torch.testing.assert_close(out, images.float(), atol=1e-4, rtol=0)
    else:  # grey, blurred, solarised: three equal channels
        torch.testing.assert_close(out[:, 0], out[:, 1], atol=1e-4, rtol=0)


def test_recipe_bytes_per_image_per_view_within_25_MB_at_224():
    """The memory-traffic budget of the device recipe on a GPU (float16 work, bf16 out): every op counted as its own
    pass over device memory (benchmarks/traffic.py)."""
    result = recipe_traffic(AugmentConfig(solarize_p=0.2), 224, 64, torch.float16, torch.bfloat16)
    assert result["bytes_per_image_per_view"] <= 25e6, result["by_op"]


# On CUDA the plan's numbers also go through pinned memory (aten::pin_memory and an asynchronous copy): two ops that
# a CPU does not dispatch; the budget per view is 80 on the GPU.
RECIPE_OPS_ON_CPU = 80 - 2


@pytest.mark.parametrize("recipe", [AugmentConfig(solarize_p=0.2), STRONG], ids=["imagenet", "strong"])
def test_recipe_ops_per_view_are_few_and_fixed(recipe):
    """Every aten op counted (views included): the same count for any batch and any draw (no launch per image or
    per run of images), within the budget."""
    from dogo.benchmarks.train_step import OpCounter
    counts = set()
    for n, seed in ((8, 0), (64, 1), (64, 2)):
        rec = A.DeviceRecipe(recipe, 32, torch.device("cpu"), torch.bfloat16, True, work=torch.float16)
        images, the_plan = _uint8_images(n, 32, seed), A.plan(P.draw(recipe, P.stream_keys(seed, 0, np.arange(n), 0)))
        rec.apply(images, the_plan)  # cached constants made outside the count
        with OpCounter() as counter:
            rec.apply(images, the_plan)
        counts.add(len(counter.ops))
    assert len(counts) == 1 and counts.pop() <= RECIPE_OPS_ON_CPU, counts


def test_the_byte_counter_counts_what_ops_read_and_write():
    from dogo.benchmarks.traffic import ByteCounter
    x, rows = torch.zeros(1000), torch.arange(10)
    with ByteCounter() as c:
        y = x * 2  # reads 4 kB, writes 4 kB
        y.add_(1)  # reads and writes 4 kB
        x[:500].view(-1)  # views move nothing
        x.index_select(0, rows)  # reads the 10 rows it selects (and the 10 int64 indices), writes them
    assert c.total == 8000 + 8000 + (40 + 40 + 80)


# ---- the CPU-worker recipe (augment.place=workers) -------------------------------------------------------------

def test_cpu_recipe_equals_torchvision_within_uint8_rounding():
    """Fixed parameters through the numba and OpenCV recipe against torchvision's float pipeline on the same
    image: within one grey level (one rounding to uint8, and the blur's)."""
    n, size = 120, 24
    images = _uint8_images(n, size, seed=2)
    p = P.draw(STRONG, P.stream_keys(1, 0, np.arange(n), 0))
    rec = CpuRecipe(STRONG, size)
    for i in range(n):
        out = np.empty((size, size, 3), np.uint8)
        rec.colour(images[i].permute(1, 2, 0).numpy().copy(), p, i, out)
        want = torchvision_recipe(images[i], p, i, STRONG, size).permute(1, 2, 0).numpy()
        assert np.abs(out.astype(np.float32) - want).max() <= 1.0, f"image {i}"


@pytest.mark.parametrize("sigma", [0.1, 0.4, 0.8, 1.3, 2.0])
def test_cpu_blur_at_224_equals_torchvision_within_one_grey_level(sigma):
    """The 23-tap blur of 224 px views without its negligible outer taps (blur_taps) against torchvision's float
    blur with all of them, on noise (where dropped taps would show most) and on a photo-like gradient."""
    size = 224
    taps = A.blur_kernel_size(size, STRONG.blur_kernel_fraction)
    noise = _uint8_images(1, size, seed=5)[0]
    ramp = torch.linspace(0, 255, size).round().to(torch.uint8).expand(3, size, size).contiguous()
    for image in (noise, ramp):
        hwc = image.permute(1, 2, 0).numpy().copy()
        k = blur_taps(sigma, taps)
        got = cv2.sepFilter2D(hwc, -1, k, k, borderType=cv2.BORDER_REFLECT_101) if len(k) > 1 else hwc
        want = TF.gaussian_blur(image.float(), [taps, taps], [sigma, sigma]).permute(1, 2, 0).numpy()
        assert np.abs(got.astype(np.float32) - want).max() <= 1.0
        assert np.abs(got.astype(np.float32) - want).mean() < 0.3  # rounding, not a shifted result


def test_cpu_hue_equals_torchvision_on_edge_colours():
    """The workers' hue kernel (branch-free) on grey pixels, the g == b seam, primaries and secondaries."""
    from dogo.pipelines.recipe.cpu import _hue
    colours = np.array([[0, 0, 0], [255, 255, 255], [90, 90, 90], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                        [255, 255, 0], [0, 255, 255], [255, 0, 255], [200, 50, 50], [10, 200, 200], [1, 0, 0],
                        [128, 64, 64], [64, 128, 128]], np.float32)
    for shift in np.linspace(-0.5, 0.5, 9, dtype=np.float32):
        planes = np.ascontiguousarray(colours.T)
        _hue(planes, shift)
        want = TF.adjust_hue(torch.from_numpy(colours.T.copy()).view(3, 1, -1) / 255, float(shift)) * 255
        np.testing.assert_allclose(planes, want.view(3, -1).numpy(), atol=2e-3, rtol=0)


def test_crop_and_flip_equal_torchvision_resized_crop():
    """The workers' crop (OpenCV bilinear) samples the points of torchvision's resized_crop without antialiasing,
    which the CIFAR backend's batched crop also samples; the flip mirrors it."""
    rng = np.random.default_rng(3)
    image = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
    keys = P.stream_keys(0, 0, np.arange(30), 0)
    boxes = P.crop_boxes(keys, 40, 56, (0.08, 1.0), (3 / 4, 4 / 3))
    tensor = torch.from_numpy(image).permute(2, 0, 1).float()
    for k, (left, top, w, h) in enumerate(boxes):
        for flip in (False, True):
            got = crop_and_flip(image, (left, top, w, h), flip, 24).astype(np.float32)
            want = TF.resized_crop(tensor, int(top), int(left), int(h), int(w), [24, 24], antialias=False)
            if flip:
                want = TF.horizontal_flip(want)
            assert np.abs(got - want.permute(1, 2, 0).numpy()).max() <= 1.0, f"box {k}"
            if not flip:  # the device's batched crop, the same points
                dev = A.resized_crops(torch.from_numpy(image).permute(2, 0, 1)[None], torch.tensor([[left, top, w, h]]),
                                      torch.tensor([False]), 24)[0]
                torch.testing.assert_close(dev, want, atol=2e-3, rtol=0)  # float32 rounding of the coordinates


def test_both_placements_make_the_same_views():
    """The same images and streams through the device recipe and through the CPU recipe: the same views within
    one grey level, so a run's statistics do not depend on where the recipe runs."""
    n, size = 64, 20
    images = _uint8_images(n, size, seed=4)
    p = P.draw(STRONG, P.stream_keys(7, 0, np.arange(n), 1))
    device = _device_views(images, p, STRONG, size, torch.float32)
    rec = CpuRecipe(STRONG, size)
    cpu = np.stack([rec.colour(images[i].permute(1, 2, 0).numpy().copy(), p, i, np.empty((size, size, 3), np.uint8))
                    for i in range(n)])
    assert np.abs(cpu.astype(np.float32) - device.permute(0, 2, 3, 1).numpy()).max() <= 1.0


@pytest.mark.slow
def test_compiled_recipe_equals_eager():
    """precision.compile: torch.compile fuses each operation (C++ kernels here, Triton on CUDA); the views equal the
    eager ones to float rounding, for batches whose runs have other sizes than the first (dynamic shapes)."""
    size = 24
    for n, seed in ((40, 0), (56, 1)):
        images = _uint8_images(n, size, seed)
        p = P.draw(STRONG, P.stream_keys(seed, 0, np.arange(n), 0))
        plan = A.plan(p)
        views = [A.DeviceRecipe(STRONG, size, torch.device("cpu"), torch.float32, False, compile=c).apply(images, plan)
                 for c in (False, True)]
        torch.testing.assert_close(views[1], views[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("layout", ["nhwc", "nchw", "float"])
def test_normalise_equals_float64_on_every_input_layout(channels_last, layout):
    """The CPU's compiled pass (uint8 views as the workers write them, NHWC) and torch's (anything else) give
    (x / 255 - mean) / std to float32 rounding, in the asked memory format."""
    recipe = AugmentConfig()
    nhwc = torch.randint(0, 256, (5, 7, 9, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    x = {"nhwc": nhwc.permute(0, 3, 1, 2), "nchw": nhwc.permute(0, 3, 1, 2).contiguous(),
         "float": nhwc.permute(0, 3, 1, 2).float()}[layout]
    got = A.normalise(x, recipe, torch.float32, channels_last)
    mean, std = torch.tensor(recipe.mean).double().view(1, 3, 1, 1), torch.tensor(recipe.std).double().view(1, 3, 1, 1)
    want = (nhwc.permute(0, 3, 1, 2).double() / 255 - mean) / std
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=fmt)

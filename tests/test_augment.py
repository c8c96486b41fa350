"""The batched recipe, op by op, against torchvision.transforms.v2.functional applied image by image."""
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from dogo.engine.config import AugmentConfig
from dogo.pipelines import augment as A


def _images(n=6, size=20, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _factors(n, lo, hi, seed):
    return lo + (hi - lo) * torch.rand(n, generator=torch.Generator().manual_seed(seed))


def _per_image(fn, x, values):
    return torch.stack([fn(img, float(v)) for img, v in zip(x, values)])


@pytest.mark.parametrize("ours,theirs,lo,hi", [
    (A.adjust_brightness, TF.adjust_brightness, 0.2, 1.8),
    (A.adjust_contrast, TF.adjust_contrast, 0.2, 1.8),
    (A.adjust_saturation, TF.adjust_saturation, 0.2, 1.8),
    (A.adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_colour_ops_equal_torchvision(ours, theirs, lo, hi):
    x = _images(seed=1)
    f = _factors(len(x), lo, hi, seed=2)
    torch.testing.assert_close(ours(x.clone(), f), _per_image(theirs, x, f), rtol=0, atol=1e-5)


def test_grayscale_solarize_flip_equal_torchvision():
    x = _images(seed=3)
    torch.testing.assert_close(A.grayscale(x).expand_as(x), TF.rgb_to_grayscale(x, num_output_channels=3),
                               rtol=0, atol=1e-6)
    ones = torch.ones(len(x), dtype=torch.bool)
    recipe = AugmentConfig(flip_p=1, jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=1)
    params = A.ViewParams(flip=ones, jitter=~ones, brightness=ones.float(), contrast=ones.float(),
                          saturation=ones.float(), hue=0 * ones.float(), order=torch.arange(4).repeat(len(x), 1),
                          gray=~ones, blur=~ones, sigma=ones.float(), solarize=ones)
    got = A.apply_params(x, params, recipe, blur_size=3)
    torch.testing.assert_close(got, TF.solarize(TF.horizontal_flip(x), threshold=0.5), rtol=0, atol=0)


@pytest.mark.parametrize("size", [3, 9, 23])
def test_blur_with_per_image_sigma_equals_torchvision(size):
    x = _images(n=5, size=32, seed=4)
    sigma = _factors(len(x), 0.1, 2.0, seed=5)
    ref = torch.stack([TF.gaussian_blur(img, [size, size], [float(s), float(s)]) for img, s in zip(x, sigma)])
    torch.testing.assert_close(A.gaussian_blur(x, sigma, size), ref, rtol=0, atol=1e-5)


def test_whole_recipe_with_fixed_parameters_equals_torchvision_per_image():
    """Random parameters drawn once, then applied by both: ours batched, torchvision image by image in each
    image's own jitter order."""
    recipe = AugmentConfig(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, grayscale_p=0.3, blur_p=0.5,
                           solarize_p=0.3)
    x = _images(n=24, size=24, seed=6)
    params = A.draw_params(recipe, len(x), torch.Generator().manual_seed(7), x.device)
    got = A.apply_params(x.clone(), params, recipe, blur_size=5)
    ops = [lambda im, i: TF.adjust_brightness(im, float(params.brightness[i])),
           lambda im, i: TF.adjust_contrast(im, float(params.contrast[i])),
           lambda im, i: TF.adjust_saturation(im, float(params.saturation[i])),
           lambda im, i: TF.adjust_hue(im, float(params.hue[i]))]
    for i, im in enumerate(x):
        if params.flip[i]:
            im = TF.horizontal_flip(im)
        if params.jitter[i]:
            for k in params.order[i].tolist():
                im = ops[k](im, i)
        if params.gray[i]:
            im = TF.rgb_to_grayscale(im, num_output_channels=3)
        if params.blur[i]:
            s = float(params.sigma[i])
            im = TF.gaussian_blur(im, [5, 5], [s, s])
        if params.solarize[i]:
            im = TF.solarize(im, threshold=0.5)
        torch.testing.assert_close(got[i], im, rtol=0, atol=1e-5, msg=f"image {i}")


def test_uint8_output_within_one_grey_level():
    """Through BatchAugment (uint8 in, normalised out): undoing the normalisation lands within 1 grey level of
    torchvision on the uint8 image."""
    recipe = AugmentConfig(jitter_p=1.0, grayscale_p=0, blur_p=0, hue=0.0, saturation=0.0, contrast=0.0)
    images = (torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 255).to(torch.uint8)
    aug = A.BatchAugment(recipe, 16, torch.float32, channels_last=False)
    out = aug(images, seed=11, rows=slice(0, 8), global_rows=8)
    mean, std = torch.tensor(recipe.mean).view(1, 3, 1, 1), torch.tensor(recipe.std).view(1, 3, 1, 1)
    back = (out * std + mean) * 255
    params = A.draw_params(recipe, 8, torch.Generator().manual_seed(11), images.device)
    for i in range(8):
        im = TF.horizontal_flip(images[i]) if params.flip[i] else images[i]
        ref = TF.adjust_brightness(im, float(params.brightness[i])).float()
        assert (back[i] - ref).abs().max() <= 1.0


@pytest.mark.parametrize("p", [1e-12, 1.0])
def test_recipe_when_no_image_or_every_image_takes_each_op(p):
    """On the CPU each op runs on the images that take it only: none (empty selections: the ops are on, but no
    image draws them) and all must both work."""
    recipe = AugmentConfig(flip_p=p, jitter_p=p, grayscale_p=p, blur_p=p, solarize_p=p)
    images = (torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 255).to(torch.uint8)
    out = A.BatchAugment(recipe, 16, torch.float32, channels_last=False)(images, 3, slice(0, 4), 4)
    assert out.shape == (4, 3, 16, 16) and torch.isfinite(out).all()
    if p < 1:  # nothing applied: only the normalisation
        mean, std = torch.tensor(recipe.mean).view(1, 3, 1, 1), torch.tensor(recipe.std).view(1, 3, 1, 1)
        torch.testing.assert_close(out, (images.float() / 255 - mean) / std)
    else:  # grayscale then solarise on every image: three equal channels
        torch.testing.assert_close(out[:, 0] * 0.229 + 0.485, out[:, 1] * 0.224 + 0.456)


def test_drawn_parameters_follow_the_recipe_over_thousands_of_images():
    """Rates and ranges of the per-image draws, within 4.5 standard errors over 4,000 images."""
    recipe = AugmentConfig(solarize_p=0.1)
    n = 4000
    p = A.draw_params(recipe, n, torch.Generator().manual_seed(123), torch.device("cpu"))
    for mask, rate in ((p.flip, recipe.flip_p), (p.jitter, recipe.jitter_p), (p.gray, recipe.grayscale_p),
                       (p.blur, recipe.blur_p), (p.solarize, recipe.solarize_p)):
        assert abs(mask.float().mean().item() - rate) < 4.5 * (rate * (1 - rate) / n) ** 0.5
    for factor, strength in ((p.brightness, recipe.brightness), (p.contrast, recipe.contrast),
                             (p.saturation, recipe.saturation)):
        lo, hi = 1 - strength, 1 + strength
        assert factor.min() >= lo and factor.max() <= hi
        assert factor.min() < lo + 0.01 and factor.max() > hi - 0.01  # the whole range is drawn
        assert abs(factor.mean().item() - 1) < 4.5 * (2 * strength) / (12 * n) ** 0.5  # uniform: sd = width/sqrt(12)
    assert p.hue.min() >= -recipe.hue and p.hue.max() <= recipe.hue and p.hue.abs().max() > 0.99 * recipe.hue
    lo, hi = recipe.blur_sigma
    assert p.sigma.min() >= lo and p.sigma.max() <= hi
    # every image's jitter order is a permutation, each op equally likely at each slot
    assert (p.order.sort(dim=1).values == torch.arange(4)).all()
    for slot in range(4):
        share = torch.bincount(p.order[:, slot], minlength=4).float() / n
        assert (share - 0.25).abs().max() < 4.5 * (0.25 * 0.75 / n) ** 0.5

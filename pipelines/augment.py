"""The SimCLR recipe after the crop, applied to a whole uint8 batch on its device.

flip -> colour jitter (p, random order per image, as torchvision's ColorJitter) -> grayscale (p) -> Gaussian blur
(per-image sigma, p) -> solarise (p) -> normalise -> training dtype, channels_last. Every random parameter is drawn
per image from a generator seeded per (step, view), for the *global* batch, of which each rank keeps its own rows:
the result does not depend on the world size, and resume needs no generator state.

The colour operations follow torchvision.transforms.v2.functional on float images in [0, 1].
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_HSV_OFFSETS = (5.0, 3.0, 1.0)  # hsv_to_rgb's n for R, G, B


@functools.lru_cache(maxsize=None)
def channel_constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, C, 1, 1) constant on `device`, copied there once: a host-to-device copy in every step would make the
    host wait for the device."""
    return torch.tensor(values, dtype=dtype).view(1, -1, 1, 1).to(device)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    return (x * channel_constant(_GRAY, x.device, x.dtype)).sum(dim=1, keepdim=True)


def _per_image(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_image(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_image(factor)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_image(factor)
    return (f * x + (1 - f) * grayscale(x)).clamp_(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) in [0, 1] -> hue (fraction of a turn), saturation, value, each (N, H, W); as torchvision."""
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = ((hr + hg + hb) / 6.0 + 1.0) % 1.0
    return h, s, maxc


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Channel n in (R, G, B) = v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6, n = 5, 3, 1: the same
    piecewise-linear function of hue as torchvision's six-sector table, without building the table."""
    n = channel_constant(_HSV_OFFSETS, h.device, h.dtype)
    k = (n + 6.0 * h.unsqueeze(1)) % 6.0
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    vs = (v * s).unsqueeze(1)
    return (v.unsqueeze(1) - vs * ramp).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (fraction of a turn, in [-0.5, 0.5]) through HSV, as torchvision does."""
    h, s, v = rgb_to_hsv(x)
    return hsv_to_rgb((h + shift.view(-1, 1, 1)) % 1.0, s, v)


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(N,) sigmas -> (N, size) normalised 1-D kernels, as torchvision's _get_gaussian_kernel1d."""
    half = (size - 1) * 0.5
    xs = torch.linspace(-half, half, size, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (xs.view(1, -1) / sigma.view(-1, 1)).square())
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Separable blur with one sigma per image, reflect padding (torchvision's choice)."""
    n, c, h, w = x.shape
    k = gaussian_kernels(sigma, size).to(x.dtype).repeat_interleave(c, dim=0)  # (N*C, size)
    pad = size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, size), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, size, 1), groups=n * c)
    return y.view(n, c, h, w)


def blur_kernel_size(image_size: int, fraction: float) -> int:
    """About `fraction` of the side, odd, at least 3."""
    k = max(3, int(round(image_size * fraction)))
    return k if k % 2 else k + 1


@dataclass
class ViewParams:
    """Per-image random parameters of one view, each (N,) on the device."""
    flip: torch.Tensor  # bool
    jitter: torch.Tensor  # bool: apply colour jitter at all
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor  # (N, 4) int64: a permutation of (brightness, contrast, saturation, hue) per image
    gray: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor
    solarize: torch.Tensor  # bool


def draw_params(recipe, n: int, generator: torch.Generator, device: torch.device) -> ViewParams:
    """Draw the recipe's random parameters for n images (uniform factors as torchvision's ColorJitter)."""
    u = torch.rand(n, 10, generator=generator, device=device)

    def factor(col: int, strength: float) -> torch.Tensor:
        return 1 - strength + 2 * strength * u[:, col]

    lo, hi = recipe.blur_sigma
    order = torch.rand(n, 4, generator=generator, device=device).argsort(dim=1)
    return ViewParams(
        flip=u[:, 0] < recipe.flip_p,
        jitter=u[:, 1] < recipe.jitter_p,
        brightness=factor(2, recipe.brightness),
        contrast=factor(3, recipe.contrast),
        saturation=factor(4, recipe.saturation),
        hue=(2 * u[:, 5] - 1) * recipe.hue,
        order=order,
        gray=u[:, 6] < recipe.grayscale_p,
        blur=u[:, 7] < recipe.blur_p,
        sigma=lo + (hi - lo) * u[:, 8],
        solarize=u[:, 9] < recipe.solarize_p,
    )


def computes_subsets(device: torch.device) -> bool:
    """Whether ops run on the images that draw them only (data-dependent shapes: fine on a CPU, a host sync on a
    GPU). The tests turn it off to run the GPU's branch on the CPU."""
    return device.type == "cpu"


def _select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), a, b)


def _apply_where(mask: torch.Tensor, fn, x: torch.Tensor, *per_image: torch.Tensor) -> torch.Tensor:
    """fn(x[i], per_image[i]...) for the images where mask is true, x elsewhere.

    On a GPU fn runs on the whole batch and the result is selected by mask: no data-dependent shapes, so no host
    synchronisation. On a CPU only the chosen images are computed: there the work, not the synchronisation, is
    what costs.
    """
    if not computes_subsets(x.device):
        return _select(mask, fn(x, *per_image), x)
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:  # some ops (reflect padding) refuse an empty batch
        return x
    return x.index_copy(0, idx, fn(x.index_select(0, idx), *(v.index_select(0, idx) for v in per_image)))


def _jitter_slot(x: torch.Tensor, p: ViewParams, op: torch.Tensor) -> torch.Tensor:
    """One slot of the jitter: image i applies operation op[i] (0 brightness, 1 contrast, 2 saturation, 3 hue).

    Brightness, contrast and saturation are all torchvision's blend clamp(f x + (1 - f) t) with t = 0, the image's
    mean grey or its grey, so one blend with per-image f and t serves every image of the slot; hue goes through
    _apply_where.
    """
    on = p.jitter
    f = torch.where(op == 0, p.brightness, torch.where(op == 1, p.contrast, p.saturation))
    f = torch.where(on & (op < 3), f, torch.ones_like(f)).view(-1, 1, 1, 1)
    g = grayscale(x)
    target = torch.where((op == 1).view(-1, 1, 1, 1), g.mean(dim=(1, 2, 3), keepdim=True),
                         torch.where((op == 2).view(-1, 1, 1, 1), g, torch.zeros_like(g)))
    out = (f * x + (1 - f) * target).clamp_(0, 1)  # f = 1, t = 0 leaves the hue images as they are
    hue = on & (op == 3)
    return _apply_where(hue, lambda im, shift: adjust_hue(im, shift), out, p.hue)


def apply_params(x: torch.Tensor, p: ViewParams, recipe, blur_size: int) -> torch.Tensor:
    """Float images in [0, 1], (N, 3, H, W) -> augmented, still in [0, 1]. No host synchronisation."""
    x = _apply_where(p.flip, lambda im: im.flip(-1), x)
    if recipe.jitter_p > 0:
        for slot in range(4):  # each image applies its four operations in its own order
            x = _jitter_slot(x, p, p.order[:, slot])
    if recipe.grayscale_p > 0:
        x = _apply_where(p.gray, lambda im: grayscale(im).expand_as(im), x)
    if recipe.blur_p > 0:
        x = _apply_where(p.blur, lambda im, sigma: gaussian_blur(im, sigma, blur_size), x, p.sigma)
    if recipe.solarize_p > 0:
        x = _apply_where(p.solarize, lambda im: torch.where(im >= 0.5, 1 - im, im), x)
    return x


def draw_crop_boxes(n: int, height: int, width: int, scale, ratio, generator: torch.Generator,
                    device: torch.device) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for n images of one size at once: (n, 4) float (left, top, w, h),
    whole pixels. Ten tries per image, the first that fits is kept, else the central crop at the nearest allowed
    ratio; every try is drawn for every image, so there is no data-dependent loop (and no host sync)."""
    tries = 10
    u = torch.rand(n, tries, 4, generator=generator, device=device, dtype=torch.float64)
    target = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w, h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # argmax returns the first of equal maxima

    def chosen(t: torch.Tensor) -> torch.Tensor:
        return t.gather(1, first).squeeze(1)

    w, h = chosen(w), chosen(h)
    top = torch.floor(chosen(u[..., 2]) * (height - h + 1))
    left = torch.floor(chosen(u[..., 3]) * (width - w + 1))
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    ok = fits.any(dim=1)
    box = torch.stack([torch.where(ok, left, (width - fw) // 2), torch.where(ok, top, (height - fh) // 2),
                       torch.where(ok, w, fw), torch.where(ok, h, fh)], dim=1)
    return box.float()


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box i of image i and resize it to size x size, bilinear, in one grid_sample for the batch.

    uint8 or float (N, C, H, W) -> float32 in [0, 1]. The sampling points are torchvision's resized_crop without
    antialiasing (F.interpolate, align_corners=False): output pixel j reads crop coordinate (j + 0.5) w / size - 0.5,
    clamped to the crop, so no pixel outside the box leaks in.
    """
    x = images.float().div(255) if images.dtype == torch.uint8 else images.float()
    n, _, height, width = x.shape
    centres = (torch.arange(size, device=x.device, dtype=torch.float32) + 0.5) / size  # (size,)
    left, top, w, h = boxes.unbind(dim=1)

    def axis(start: torch.Tensor, extent: torch.Tensor, full: int) -> torch.Tensor:
        at = start.view(-1, 1) + centres.view(1, -1) * extent.view(-1, 1) - 0.5
        at = torch.minimum(torch.maximum(at, start.view(-1, 1)), (start + extent - 1).view(-1, 1))
        return (2 * at + 1) / full - 1  # grid_sample's coordinates (align_corners=False)

    gx, gy = axis(left, w, width), axis(top, h, height)
    grid = torch.stack([gx.view(n, 1, size).expand(n, size, size), gy.view(n, size, 1).expand(n, size, size)],
                       dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def normalise(x: torch.Tensor, recipe, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """Float images in [0, 1] -> (x - mean) / std in the training dtype and memory format."""
    x = (x - channel_constant(tuple(recipe.mean), x.device, x.dtype)) / \
        channel_constant(tuple(recipe.std), x.device, x.dtype)
    return x.to(dtype=dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class BatchAugment:
    """Callable: uint8 (b, 3, S, S) on the device -> normalised views in the training dtype and memory format."""

    def __init__(self, recipe, image_size: int, dtype: torch.dtype, channels_last: bool):
        self.recipe = recipe
        self.blur_size = blur_kernel_size(image_size, recipe.blur_kernel_fraction)
        self.dtype = dtype
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor, seed: int, rows: slice, global_rows: int) -> torch.Tensor:
        """`rows` of a global batch of `global_rows` images: parameters are drawn for all, then sliced."""
        return self.from_float(images.float().div_(255), seed, rows, global_rows)

    def from_float(self, x: torch.Tensor, seed: int, rows: slice, global_rows: int) -> torch.Tensor:
        """As __call__, for float images in [0, 1] (a batched crop's output); x may be modified in place."""
        device = x.device
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        params = draw_params(self.recipe, global_rows, gen, device)
        params = ViewParams(**{k: v[rows] for k, v in vars(params).items()})
        x = apply_params(x, params, self.recipe, self.blur_size)
        return normalise(x, self.recipe, self.dtype, self.channels_last)

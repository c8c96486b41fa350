"""The whole recipe for one image on a CPU core, in uint8 in and out (augment.place: workers).

Per view of a decoded image (H, W, 3) uint8: RandomResizedCrop (box from the image's parameter stream, bilinear
resize) and horizontal flip (OpenCV), then colour jitter in the image's own order, grayscale (numba kernels on
float32 channel planes: each operation exactly as torchvision's on float images, rounded once at the end), then
Gaussian blur (OpenCV's separable filter, reflect-101 borders as torchvision) and solarisation. The parameters are
the ones the device recipe would draw for the same image (params.py), so a run's statistics do not depend on where
the recipe runs; the device then only normalises (one operation).

Each kernel was chosen by timing the alternatives on our CPU at 224 px (numba on channel planes over OpenCV's float
HSV round trip and over one fused per-pixel kernel; OpenCV's separable filter over its GaussianBlur; cv2.resize over
PIL's); the recipe's time today is in benchmarks/results/recipe_cpu_workers_224px_cpu2.json.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numba
import numpy as np

from dogo.pipelines.recipe import params as P
from dogo.pipelines.recipe.device import Plan, blur_kernel_size, plan as device_plan

_R, _G, _B = np.float32(0.2989), np.float32(0.587), np.float32(0.114)  # torchvision's luma weights
_ZERO, _ONE, _TOP = np.float32(0), np.float32(1), np.float32(255)


# The conversions index flat arrays: with (y, x) indices the loops did not vectorise (7x slower here).
@numba.njit(cache=True, nogil=True)
def _to_planes(pixels, planes):
    """pixels (H * W * 3,) uint8, RGBRGB... -> planes (3, H * W) float32."""
    for i in range(planes.shape[1]):
        planes[0, i] = pixels[3 * i]
        planes[1, i] = pixels[3 * i + 1]
        planes[2, i] = pixels[3 * i + 2]


@numba.njit(cache=True, nogil=True, fastmath=True)
def _affine(planes, f, c):
    """clamp(f x + c, 0, 255): brightness (c = 0) and contrast (c = (1 - f) mean luma), as torchvision's blend."""
    r, g, b = planes[0], planes[1], planes[2]
    for i in range(r.size):
        r[i] = min(max(f * r[i] + c, _ZERO), _TOP)
        g[i] = min(max(f * g[i] + c, _ZERO), _TOP)
        b[i] = min(max(f * b[i] + c, _ZERO), _TOP)


@numba.njit(cache=True, nogil=True)
def _luma(red, green, blue):
    return _R * red + _G * green + _B * blue


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _mean_luma(planes):
    """The mean of each pixel's float32 luma, summed in float64; the sum in any order (it vectorises: 8x faster),
    each luma exactly as torchvision's (_luma has no fast-math)."""
    r, g, b = planes[0], planes[1], planes[2]
    total = 0.0
    for i in range(r.size):
        total += _luma(r[i], g[i], b[i])
    return np.float32(total / r.size)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _saturation(planes, f):
    """clamp(f x + (1 - f) luma(x), 0, 255)."""
    r, g, b = planes[0], planes[1], planes[2]
    k = _ONE - f
    for i in range(r.size):
        y = k * (_R * r[i] + _G * g[i] + _B * b[i])
        r[i] = min(max(f * r[i] + y, _ZERO), _TOP)
        g[i] = min(max(f * g[i] + y, _ZERO), _TOP)
        b[i] = min(max(f * b[i] + y, _ZERO), _TOP)


@numba.njit(cache=True, nogil=True)
def _ramp(k):
    """torchvision's hsv_to_rgb as a function of the channel's phase k (in sixths of a turn): clamp(min(k mod 6,
    4 - k mod 6), 0, 1)."""
    k = k - np.float32(6) * np.floor(k / np.float32(6))
    return min(max(min(k, np.float32(4) - k), _ZERO), _ONE)


@numba.njit(cache=True, nogil=True)
def _hue(planes, shift):
    """torchvision's adjust_hue: each pixel's hue rotated by `shift` turns, its max and min kept (the formula of
    augment.hue_, per pixel). Branch-free, so that the loop vectorises (2.3x faster here, and without fastmath
    bit for bit the branching version's result): a grey pixel (chroma 0) comes out as its own value through the
    same formula, its hue term multiplied by 0."""
    r, g, b = planes[0], planes[1], planes[2]
    turn = np.float32(6) * shift
    tiny = np.float32(1e-12)
    for i in range(r.size):
        red, green, blue = r[i], g[i], b[i]
        top = max(red, max(green, blue))
        chroma = top - min(red, min(green, blue))
        a = (red - np.float32(0.5) * (green + blue)) / max(chroma, tiny) + np.float32(1.5)
        t = min(max(a, _ONE), np.float32(2)) - np.float32(2) * a  # <= 0
        u = -t if green >= blue else t  # 3 - 6h
        h = np.float32(3) - u + turn
        r[i] = top - chroma * _ramp(h + np.float32(5))
        g[i] = top - chroma * _ramp(h + np.float32(3))
        b[i] = top - chroma * _ramp(h + np.float32(1))


@numba.njit(cache=True, nogil=True)
def _to_image(planes, gray, pixels):
    """planes -> pixels (H * W * 3,) uint8, rounded; all three channels the luma where `gray`."""
    half = np.float32(0.5)
    for i in range(planes.shape[1]):
        red, green, blue = planes[0, i], planes[1, i], planes[2, i]
        if gray:
            red = green = blue = _luma(red, green, blue)
        pixels[3 * i] = np.uint8(red + half)
        pixels[3 * i + 1] = np.uint8(green + half)
        pixels[3 * i + 2] = np.uint8(blue + half)


def gaussian_kernel(sigma: float, size: int) -> np.ndarray:
    """torchvision's _get_gaussian_kernel1d, float32."""
    xs = np.linspace(-(size - 1) / 2, (size - 1) / 2, size)
    k = np.exp(-0.5 * (xs / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


# The weight a blur pass may leave out: its effect on a pixel is at most 255 x that, 0.1 of a grey level per pass.
BLUR_TAIL = 0.1 / 255


def blur_taps(sigma: float, size: int) -> np.ndarray:
    """torchvision's `size`-tap kernel without its outer taps where together they weigh at most BLUR_TAIL: what
    they add cannot move a uint8 pixel by more than a fraction of a grey level, and a filter costs its taps (a
    23-tap kernel at sigma 1 keeps 7, 2-3x faster). One tap left means no blur at all."""
    k = gaussian_kernel(sigma, size)
    tail = np.cumsum(k[:size // 2])  # weight of the outer taps on one side, by how many are dropped
    drop = int(np.searchsorted(tail, BLUR_TAIL / 2, side="right"))
    return k[drop:size - drop]


def _flat(pixels: np.ndarray) -> np.ndarray:
    """An (S, S, 3) image's pixels as one flat view (never a copy: the kernels write through it)."""
    if not pixels.flags.c_contiguous:
        raise ValueError("the CPU recipe works on C-contiguous (S, S, 3) images")
    return pixels.reshape(-1)


_SOLARIZE = np.where(np.arange(256) >= 128, 255 - np.arange(256), np.arange(256)).astype(np.uint8)


class CpuRecipe:
    """The recipe on the CPU: one decoded image and its parameter streams -> its n_views views, uint8 (S, S, 3)."""

    def __init__(self, recipe, image_size: int):
        self.recipe, self.size = recipe, image_size
        self.blur_size = blur_kernel_size(image_size, recipe.blur_kernel_fraction)
        self._planes = np.empty((3, image_size * image_size), np.float32)  # scratch, one per process
        cv2.setNumThreads(1)  # one worker, one core: the loader runs several workers

    def views(self, image: np.ndarray, keys: list[np.ndarray], out: np.ndarray) -> np.ndarray:
        """image (H, W, 3) uint8; keys: per view, the image's stream key (shape (1,)); out (n_views, S, S, 3)."""
        height, width = image.shape[:2]
        r = self.recipe
        for v, key in enumerate(keys):
            p = P.draw(r, key)
            box = P.crop_boxes(key, height, width, r.crop_scale, r.crop_ratio)[0]
            self.colour(crop_and_flip(image, box, bool(p.flip[0]), self.size), p, 0, out[v])
        return out

    def colour(self, view: np.ndarray, p: P.ViewParams, i: int, out: np.ndarray) -> np.ndarray:
        """The recipe after the crop and flip for image i of p: `view` (S, S, 3) uint8 -> out (may be view)."""
        if p.jitter[i] or p.gray[i]:
            planes = self._planes
            _to_planes(_flat(view), planes)
            f = p.factors[i].astype(np.float32)
            for op in (p.order[i] if p.jitter[i] else ()):
                if op == 0:
                    _affine(planes, f[0], _ZERO)
                elif op == 1:
                    _affine(planes, f[1], (_ONE - f[1]) * _mean_luma(planes))
                elif op == 2:
                    _saturation(planes, f[2])
                else:
                    _hue(planes, f[3])
            _to_image(planes, bool(p.gray[i]), _flat(out))
        elif out is not view:
            out[...] = view
        if p.blur[i]:
            k = blur_taps(float(p.sigma[i]), self.blur_size)
            if len(k) > 1:
                cv2.sepFilter2D(out, -1, k, k, dst=out, borderType=cv2.BORDER_REFLECT_101)
        if p.solarize[i]:
            cv2.LUT(out, _SOLARIZE, dst=out)
        return out


def crop_and_flip(image: np.ndarray, box, flip: bool, size: int) -> np.ndarray:
    """RandomResizedCrop's box resized to size x size (bilinear, as F.interpolate without antialiasing: the
    device's batched crop samples the same points), mirrored where `flip`."""
    left, top, w, h = (int(v) for v in box)
    view = cv2.resize(image[top:top + h, left:left + w], (size, size), interpolation=cv2.INTER_LINEAR)
    return cv2.flip(view, 1) if flip else view


@dataclass(frozen=True)
class DrawnView:
    """One view of a batch as drawn from its images' streams, before any pixel is made."""
    params: P.ViewParams
    boxes: np.ndarray  # (b, 4) crop boxes (left, top, w, h)
    plan: Plan | None  # augment.place=device: the device recipe's plan


def draw_views(group, seed: int, epoch: int, ids: np.ndarray, heights, widths, on_device: bool) -> list[DrawnView]:
    """Every view's parameters and crop boxes of a plan's group (pipelines.views.PlanGroup), in its rows' order
    [set][view], for the images `ids` of sizes (heights, widths): each view from its own stream and recipe."""
    drawn = []
    for spec in group.views:
        keys = P.stream_keys(seed, epoch, ids, spec.stream)
        p = P.draw(spec.recipe, keys)
        boxes = P.crop_boxes(keys, heights, widths, spec.recipe.crop_scale, spec.recipe.crop_ratio)
        drawn.append(DrawnView(p, boxes, device_plan(p) if on_device else None))
    return drawn


def write_views(images: Sequence[np.ndarray], rows, drawn: list[DrawnView], size: int,
                recipe: CpuRecipe | None, pixels: np.ndarray) -> None:
    """For each image k in `rows`, every view's crop and flip into pixels (n_views, b, S, S, 3) uint8: with a
    CpuRecipe (augment.place=workers) the whole recipe; without, the crop alone."""
    for k in rows:
        for v, view in enumerate(drawn):
            crop = crop_and_flip(images[k], view.boxes[k], bool(view.params.flip[k]), size)
            if recipe is None:
                pixels[v, k] = crop
            else:
                recipe.colour(crop, view.params, k, pixels[v, k])


def write_groups(images: Sequence[np.ndarray], rows, drawn: list[list[DrawnView]], sizes: Sequence[int],
                 recipes: Sequence[CpuRecipe] | None, pixels: Sequence[np.ndarray]) -> None:
    """Every group's views of the images `rows` from one decode of each: per group g, write_views into pixels[g]
    (V_g, b, S_g, S_g, 3) with its draws, size and (augment.place=workers) its CpuRecipe."""
    for g, size in enumerate(sizes):
        write_views(images, rows, drawn[g], size, None if recipes is None else recipes[g], pixels[g])

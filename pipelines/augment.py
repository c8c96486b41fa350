"""The SimCLR recipe after the crop and flip, on the training device: uint8 crops and their host-drawn parameters
(params.py) in, normalised views in the training dtype and memory format out.

colour jitter (p; brightness, contrast, saturation and hue in each image's own random order, as torchvision's
ColorJitter) -> grayscale (p) -> Gaussian blur (per-image sigma, p) -> solarise (p) -> normalise. The operations
follow torchvision.transforms.v2.functional on float images, written here on the 0..255 scale (so that the uint8
input needs no division). The crop and the flip happen where the crop is made (the folder backend's workers, the
FFCV decoder, the CIFAR backend's batched resampling): flipping commutes with every operation here.

What keeps it cheap on a GPU, where it moves bytes rather than computes (tests/test_recipe.py holds the budget):
- which images take which operation is known on the host, so each operation runs on those images only, with no
  device-to-host synchronisation and no masked whole-batch work;
- the batch is sorted once by jitter order, so that at each of the four jitter slots the images that take one
  operation lie in contiguous runs: the operations work in place on slices, with no gathers;
- the image is held in float16 on CUDA (11 significant bits: within a hundredth of a grey level of float32 on the
  0..255 scale), float32 elsewhere (CPUs without fast float16); the hue's scalar fields, which need more precision,
  in float32;
- hue through HSV costs one pass to find each pixel's hue, and one lookup of a 13-knot table (grid_sample) for the
  rotated colour, exact up to float rounding.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F

from dogo.pipelines import params as P

GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma)
_EPS = 1e-3  # chroma floor on the 0..255 scale: divides grey pixels safely; changes an output by at most 1e-3
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def work_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA (half the bytes, within 0.01 grey levels); float32 on CPUs, where float16 is emulated."""
    return torch.float16 if device.type == "cuda" else torch.float32


def blur_kernel_size(image_size: int, fraction: float) -> int:
    """About `fraction` of the view's side, odd, at least 3: the recipe's blur kernel in every backend."""
    k = max(3, int(round(image_size * fraction)))
    return k if k % 2 else k + 1


@functools.lru_cache(maxsize=None)
def constant(values: tuple, shape: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A constant on `device`, copied there once: a host-to-device copy in every step would make the host wait."""
    return torch.tensor(values, dtype=torch.float64).view(shape).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _hue_table(device: torch.device) -> torch.Tensor:
    """(1, 3, 13, 13) float32: ramp((n + h) mod 6) for the channels n = 5, 3, 1 (R, G, B) at h = -3 .. 9, the
    piecewise-linear function of hue in torchvision's hsv_to_rgb; rows equal (sampled along x only)."""
    h = torch.arange(-3, 10, dtype=torch.float64)
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64).view(3, 1) + h) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return ramp.view(1, 3, 1, 13).expand(1, 3, 13, 13).to(device=device, dtype=torch.float32).contiguous()


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on the device without making the host wait: pinned, then copied asynchronously."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


# ---------------------------------------------------------------------------------------------------------------
# Operations on float images (k, 3, H, W) on the 0..255 scale, in place; factors are (k,) tensors.

def _per_image(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def grey(x: torch.Tensor) -> torch.Tensor:
    """(k, 3, H, W) -> (k, 1, H, W) luma, one 1x1 convolution."""
    return F.conv2d(x, constant(GREY, (1, 3, 1, 1), x.device, x.dtype))


_AB = (1.0, -0.5, -0.5, 0.0, 1.0, -1.0)  # (alpha, beta) = (r - (g + b) / 2, g - b) as a 1x1 convolution


def hue_(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor | None = None, ab_weights=None,
         table=None) -> torch.Tensor:
    """torchvision's adjust_hue (through HSV): rotate each pixel's hue by `shift` turns, keep its max and min.

    With M, m the pixel's max and min channel and C = M - m, torchvision's hsv_to_rgb gives channel n as
    M - C ramp((n + 6h) mod 6). The hue h follows from a = alpha / C and the sign of beta, where alpha = r - (g + b)/2
    and beta = g - b: for g >= b (the upper half of the hexagon) 6h = 1.5 - 2a + clamp(a, -1/2, 1/2), and
    6 - that for g < b. The rotated ramp is read from a 13-knot table with linear interpolation (grid_sample), which
    is exact because the ramp is linear between integer knots.
    """
    k = x.shape[0]
    ab_weights = constant(_AB, (2, 3, 1, 1), x.device, x.dtype) if ab_weights is None else ab_weights
    table = _hue_table(x.device) if table is None else table
    m, big = torch.aminmax(x, dim=1)
    chroma = torch.sub(big, m).clamp_min_(_EPS)
    ab = F.conv2d(x, ab_weights)
    # a + 3/2 in float32 (a dimensioned float32 operand makes the result float32): float16 would cost a grey level
    a = torch.addcdiv(torch.full((1, 1, 1), 1.5, device=x.device), ab[:, 0], chroma)
    u = a.clamp(1, 2).add_(a, alpha=-2).copysign_(ab[:, 1])  # 3 - 6h
    # the table's x coordinate in [-1, 1] for the rotated hue 6h + 6 shift, which lies in [-3, 9]
    gx = torch.add(shift.to(torch.float32).view(-1, 1, 1), u, alpha=-1 / 6)
    grid = gx.unsqueeze(-1).expand(k, *gx.shape[1:], 2)  # y = x: the table's rows are equal
    ramp = F.grid_sample(table.expand(k, -1, -1, -1), grid, mode="bilinear",
                         padding_mode="border", align_corners=True)
    return torch.addcmul(big.unsqueeze(1), chroma.unsqueeze(1), ramp, value=-1, out=x if out is None else out)


def affine_(src: torch.Tensor, maps: torch.Tensor, bias: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """dst = clamp(maps_i src_i + bias_i, 0, 255) per image: brightness, contrast and saturation, each a colour
    matrix (3 x 3) and an offset per image, in one batched matrix product over the pixels."""
    n, c, h, w = src.shape
    return torch.baddbmm(bias, maps, src.view(n, c, h * w), out=dst.view(n, c, h * w)).clamp_(0, 255)


def contrast_bias_(src: torch.Tensor, f: torch.Tensor, luma: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """bias = (1 - f) m for contrast's blend f x + (1 - f) m, m the image's mean luma (the luma of its mean)."""
    mean = src.mean(dim=(2, 3)) @ luma
    return bias.copy_(((1 - f.to(src.dtype)) * mean).view(-1, 1, 1).expand_as(bias))


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(k,) sigmas -> (k, size) normalised 1-D kernels, as torchvision's _get_gaussian_kernel1d."""
    half = (size - 1) * 0.5
    xs = torch.linspace(-half, half, size, device=sigma.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (xs.view(1, -1) / sigma.view(-1, 1).float()).square())
    return kernel / kernel.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Separable blur with one sigma per image and reflect padding (torchvision's): two grouped convolutions."""
    n, c, h, w = x.shape
    if n == 0:  # reflect padding refuses an empty batch
        return x
    kernel = gaussian_kernels(sigma, size).to(x.dtype).repeat_interleave(c, dim=0)  # (n * c, size)
    pad = size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, size), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, size, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """torchvision's solarize at threshold 0.5 of the range: 255 - x where x >= 127.5."""
    return torch.where(x >= 127.5, 255 - x, x)


# ---------------------------------------------------------------------------------------------------------------
# The batch, sorted: by blur (so that the blurred images are one slice), then by jitter order (so that at each of
# the four jitter slots the images taking one kind of operation form a few contiguous runs).

NO_JITTER = len(P.ORDERS)  # the order key of images without colour jitter: after every order
GROUPS = 2 * (NO_JITTER + 1)  # (blur, order) groups: 0..24 without blur, 25..49 with


def _group_runs() -> list[dict[str, list[tuple[int, int]]]]:
    """Per jitter slot, as (first group, last group + 1) runs over the sorted groups: 'affine' for brightness,
    contrast and saturation (one per-image 3x3 colour map each), 'hue', and 'contrast' (whose mean luma the affine
    map needs first). Adjacent groups of one kind merge into one run; the runs depend on the group structure only,
    so they are worked out once."""
    def kind(group: int, slot: int) -> str | None:
        order = group % (NO_JITTER + 1)
        if order == NO_JITTER:
            return None
        return "hue" if P.ORDERS[order][slot] == HUE else "affine"

    slots = []
    for slot in range(4):
        runs: dict[str, list[tuple[int, int]]] = {"affine": [], "hue": [], "contrast": []}
        for name, test in (("affine", lambda g: kind(g, slot) == "affine"), ("hue", lambda g: kind(g, slot) == "hue"),
                           ("contrast", lambda g: kind(g, slot) == "affine"
                            and P.ORDERS[g % (NO_JITTER + 1)][slot] == CONTRAST)):
            start = None
            for g in range(GROUPS + 1):
                inside = g < GROUPS and test(g)
                if inside and start is None:
                    start = g
                elif not inside and start is not None:
                    runs[name].append((start, g))
                    start = None
        slots.append(runs)
    return slots


SLOT_RUNS = _group_runs()


def colour_maps(p: P.ViewParams, slot: int) -> np.ndarray:
    """(n, 3, 3) float32: each image's jitter operation at `slot` as a colour matrix, when it is one of the three
    blends (f I for brightness and contrast, f I + (1 - f) 1 w^T for saturation; the identity for hue, unused)."""
    n = len(p)
    op = p.order[np.arange(n), slot]
    f = p.factors[np.arange(n), np.minimum(op, SATURATION)]
    maps = np.zeros((n, 3, 3))
    maps[:, [0, 1, 2], [0, 1, 2]] = np.where(op == HUE, 1.0, f)[:, None]
    sat = op == SATURATION
    maps[sat] += (1 - f[sat])[:, None, None] * np.asarray(GREY)[None, None, :]
    return maps.astype(np.float32)


@dataclass
class Plan:
    """What the host knows of one view before the device starts: the sorted order of the batch and, in that order,
    where each operation's images are, with the numbers the device needs in two small arrays."""
    perm: np.ndarray  # sorted row k is the batch's image perm[k]
    offsets: np.ndarray  # (GROUPS + 1,) where each (blur, order) group starts
    gray: np.ndarray  # sorted positions of the images turned grey
    solarize: np.ndarray  # sorted positions of the solarised images
    maps: np.ndarray  # (4, n, 3, 3) float32: the colour matrix of each slot
    numbers: np.ndarray  # (n, 3) float32: contrast factor, hue shift, blur sigma, in sorted order

    @property
    def blurred(self) -> tuple[int, int]:
        return int(self.offsets[NO_JITTER + 1]), int(self.offsets[-1])

    def rows(self, runs: tuple[int, int]) -> tuple[int, int]:
        return int(self.offsets[runs[0]]), int(self.offsets[runs[1]])

    @property
    def restore(self) -> np.ndarray:
        """The inverse of perm: the batch's image i is sorted row restore[i]."""
        inverse = np.empty_like(self.perm)
        inverse[self.perm] = np.arange(len(self.perm))
        return inverse


def plan(p: P.ViewParams) -> Plan:
    key = np.where(p.blur, NO_JITTER + 1, 0) + np.where(p.jitter, p.order_ids(), NO_JITTER)
    perm = np.argsort(key, kind="stable")
    q = p.rows(perm)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(key, minlength=GROUPS))])
    numbers = np.stack([q.factors[:, CONTRAST], q.factors[:, HUE], q.sigma], axis=1).astype(np.float32)
    return Plan(perm, offsets, np.flatnonzero(q.gray), np.flatnonzero(q.solarize),
                np.stack([colour_maps(q, slot) for slot in range(4)]), numbers)


class DeviceRecipe:
    """The recipe on the device for one view of a batch.

    recipe.plan(params) -> Plan, on the host; recipe.apply(sorted uint8 crops, plan) -> (normalised views in the
    plan's sorted order, restore): row restore[i] of the views is the batch's image i, so the engine puts the
    embeddings, not the images, back in order (a few kB instead of a pass over every image). A caller that cannot
    sort on the host calls recipe(crops, params), which sorts on the device.

    No host synchronisation and no loop over images: Python loops over the runs of the jitter (a fixed number for
    any batch size), and every run's bounds are host numbers.
    """

    def __init__(self, recipe, image_size: int, device: torch.device, dtype: torch.dtype, channels_last: bool,
                 work: torch.dtype | None = None, compile: bool = False):
        self.recipe, self.device, self.dtype = recipe, device, dtype
        self.work = work or work_dtype(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.blur_size = blur_kernel_size(image_size, recipe.blur_kernel_fraction)
        std = np.asarray(recipe.std, dtype=np.float64)
        # (x / 255 - mean) / std as x * scale + shift
        self.scale = constant(tuple(1 / (255 * std)), (1, 3, 1, 1), device, self.work)
        self.shift = constant(tuple(-np.asarray(recipe.mean) / std), (1, 3, 1, 1), device, self.work)
        self.luma = constant(GREY, (3,), device, self.work)
        self.ab_weights, self.hue_table = constant(_AB, (2, 3, 1, 1), device, self.work), _hue_table(device)
        # precision.compile: each operation's elementwise chain fused by torch.compile (sizes vary from run to run:
        # dynamic shapes, one compilation each)
        fuse = (lambda f: torch.compile(f, dynamic=True)) if compile else (lambda f: f)
        self._affine, self._contrast_bias, self._hue = fuse(affine_), fuse(contrast_bias_), fuse(hue_)
        self._blur, self._normalise = fuse(gaussian_blur), fuse(torch.addcmul)

    plan = staticmethod(plan)

    def __call__(self, images: torch.Tensor, p: P.ViewParams) -> tuple[torch.Tensor, torch.Tensor]:
        the_plan = plan(p)
        return self.apply(images.index_select(0, to_device(the_plan.perm, self.device)), the_plan)

    def apply(self, images: torch.Tensor, the_plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (n, 3, S, S) uint8 (or 0..255 float) in the plan's sorted order."""
        n = images.shape[0]
        # one copy of the indices and one of the numbers for the whole view
        b0, b1 = the_plan.blurred
        # solarised rows, per part (not blurred, blurred), counted from each part's start
        sol = [the_plan.solarize[the_plan.solarize < b0], the_plan.solarize[the_plan.solarize >= b0] - b0]
        index = to_device(np.concatenate([the_plan.restore, the_plan.gray, *sol]).astype(np.int64), self.device)
        restore, gray_t, *sol_t = index.split([n, len(the_plan.gray), *map(len, sol)])
        numbers = to_device(np.concatenate([the_plan.numbers.reshape(-1), the_plan.maps.reshape(-1)]), self.device)
        values, maps = numbers.split([3 * n, 4 * n * 9])
        values = values.view(n, 3)
        maps = maps.view(4, n, 3, 3).to(self.work)
        x = images.to(self.work).contiguous()
        if self.recipe.jitter_p > 0:
            x = self._jitter(x, the_plan, values, maps)
        if self.recipe.grayscale_p > 0:
            x.index_copy_(0, gray_t, grey(x.index_select(0, gray_t)).expand(-1, 3, -1, -1))
        parts = [x[:b0]]
        if self.recipe.blur_p > 0:
            parts.append(self._blur(x[b0:b1], values[b0:b1, 2], self.blur_size))
        else:
            parts.append(x[b0:b1])
        if self.recipe.solarize_p > 0:
            parts = [part.index_copy(0, rows, solarize(part.index_select(0, rows))) for part, rows in zip(parts, sol_t)]
        out = torch.empty(x.shape, dtype=self.dtype, device=self.device).contiguous(memory_format=self.memory_format)
        for part, (a, b) in zip(parts, ((0, b0), (b0, b1))):
            self._normalise(self.shift, part, self.scale, out=out[a:b])
        return out, restore

    def _jitter(self, x: torch.Tensor, the_plan: Plan, values: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """The four slots, each from one buffer into the other: every jittered image takes one operation per slot,
        so after four slots they are all back in the first buffer, beside the images without jitter (untouched)."""
        n, c, h, w = x.shape
        buffers = (x, torch.empty_like(x))
        bias = torch.zeros(n, 3, 1, dtype=self.work, device=self.device)
        for slot, runs in enumerate(SLOT_RUNS):
            src, dst = buffers[slot % 2], buffers[(slot + 1) % 2]
            for run in runs["contrast"]:  # the mean luma of the image as it is now
                a, b = the_plan.rows(run)
                self._contrast_bias(src[a:b], values[a:b, 0], self.luma, bias[a:b])
            for run in runs["affine"]:
                a, b = the_plan.rows(run)
                self._affine(src[a:b], maps[slot, a:b], bias[a:b], dst[a:b])
            for run in runs["hue"]:
                a, b = the_plan.rows(run)
                self._hue(src[a:b], values[a:b, 1], dst[a:b], self.ab_weights, self.hue_table)
            for run in runs["contrast"]:  # the next slot's brightness and saturation add nothing
                a, b = the_plan.rows(run)
                bias[a:b].zero_()
        return buffers[0]


def normalise(x: torch.Tensor, recipe, dtype: torch.dtype, channels_last: bool, buffers=None) -> torch.Tensor:
    """uint8 or 0..255 float images -> (x / 255 - mean) / std in the training dtype and memory format (evaluation
    images, and the views that the workers made); the output from `buffers` (a base.ReusedBuffers) if given."""
    std = np.asarray(recipe.std, dtype=np.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if buffers is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)  # not .contiguous(): a copy
    else:
        out = buffers.take(x.shape, dtype, x.device, fmt)
    if x.device.type == "cpu" and x.dtype == torch.uint8 and dtype == torch.float32 and x.dim() == 4 and x.shape[1] == 3:
        # torch's mixed-dtype addcmul on a CPU runs at a tenth of the memory's speed here (1 ms per 224 px view,
        # a quarter of the loader's budget); one pass of a compiled loop takes 0.07 ms
        scale = (1 / (255 * std)).astype(np.float32)
        shift = (-np.asarray(recipe.mean) / std).astype(np.float32)
        n, c, h, w = x.shape
        src = x.permute(0, 2, 3, 1)  # (N, H, W, C): the layout the workers write
        if src.is_contiguous():
            src = src.numpy().reshape(n, h * w, c)
            if channels_last:
                _normalise_interleaved(src.reshape(-1), scale, shift, out.permute(0, 2, 3, 1).numpy().reshape(-1))
            else:
                _normalise_planar(src, scale, shift, out.numpy().reshape(n, c, h * w))
            return out
    if x.device.type == "cpu" and x.dtype == torch.uint8:
        x = x.float()  # torch's mixed-dtype addcmul is slow on a CPU: convert first, then one float pass
    work = torch.float32 if x.dtype == torch.uint8 else x.dtype
    scale = constant(tuple(1 / (255 * std)), (1, 3, 1, 1), x.device, work)
    shift = constant(tuple(-np.asarray(recipe.mean) / std), (1, 3, 1, 1), x.device, work)
    return torch.addcmul(shift, x, scale, out=out)


# fastmath "contract" only: fused multiply-adds, one rounding per value as torch's addcmul on the CPU, so both paths
# give the same bits and a run does not depend on which one made its views
@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def _normalise_interleaved(src, scale, shift, dst):
    """dst = src x scale + shift per channel: flat RGBRGB... uint8 -> float32 (channels last)."""
    for i in range(src.size // 3):
        dst[3 * i] = np.float32(src[3 * i]) * scale[0] + shift[0]
        dst[3 * i + 1] = np.float32(src[3 * i + 1]) * scale[1] + shift[1]
        dst[3 * i + 2] = np.float32(src[3 * i + 2]) * scale[2] + shift[2]


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def _normalise_planar(src, scale, shift, dst):
    """The same from (N, P, 3) uint8 into (N, 3, P) float32 planes (contiguous NCHW)."""
    for i in range(src.shape[0]):
        for k in range(3):
            s, t = scale[k], shift[k]
            for j in range(src.shape[1]):
                dst[i, k, j] = np.float32(src[i, j, k]) * s + t


# ---------------------------------------------------------------------------------------------------------------
# The batched crop (CIFAR): boxes from the streams, one resampling for the batch.

def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box i of image i, resize it to size x size (bilinear) and mirror it where flip[i]: one grid_sample.

    uint8 or float (N, C, H, W) -> float32 on the 0..255 scale. The sampling points are torchvision's resized_crop
    without antialiasing (F.interpolate, align_corners=False): output pixel j reads crop coordinate
    (j + 0.5) w / size - 0.5, clamped to the crop, so no pixel outside the box leaks in. Mirroring reverses the
    output's columns, i.e. reads them right to left.
    """
    x = images.float()
    n, _, height, width = x.shape
    centres = (torch.arange(size, device=x.device, dtype=torch.float32) + 0.5) / size  # (size,)
    left, top, w, h = boxes.float().unbind(dim=1)

    def axis(start: torch.Tensor, extent: torch.Tensor, full: int, at_: torch.Tensor) -> torch.Tensor:
        at = start.view(-1, 1) + at_ * extent.view(-1, 1) - 0.5
        at = torch.minimum(torch.maximum(at, start.view(-1, 1)), (start + extent - 1).view(-1, 1))
        return (2 * at + 1) / full - 1  # grid_sample's coordinates (align_corners=False)

    across = torch.where(flip.view(-1, 1), centres.flip(0).view(1, -1), centres.view(1, -1))
    gx, gy = axis(left, w, width, across), axis(top, h, height, centres.view(1, -1))
    grid = torch.stack([gx.view(n, 1, size).expand(n, size, size), gy.view(n, size, 1).expand(n, size, size)],
                       dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


"""The SimCLR recipe after the crop and flip, on the training device: uint8 crops and their host-drawn parameters
(params.py) in, normalised views in the training dtype and memory format out.

colour jitter (p; brightness, contrast, saturation and hue in each image's own random order, as torchvision's
ColorJitter) -> grayscale (p) -> Gaussian blur (per-image sigma, p) -> solarise (p) -> normalise. The operations
follow torchvision.transforms.v2.functional on float images, written here on the 0..255 scale (so that the uint8
input needs no division). The crop and the flip happen where the crop is made (the folder backend's workers, the
FFCV decoder, the CIFAR backend's batched resampling): flipping commutes with every operation here.

What keeps it cheap on a GPU, where launches count as much as bytes (tests/test_augment.py holds both budgets):
- every operation runs once on the whole batch with per-image numbers drawn on the host and copied in one transfer
  (identity maps, a zero hue flag, the unit impulse as blur kernel where an image's coin says no): a fixed number
  of launches per view whatever the batch and the draw, no device-to-host synchronisation, no gathers;
- brightness, contrast and saturation are batched 3x3 colour maps (one matrix product per stage, torchvision's
  clamp after each), the grayscale a 3x3 map too, the blur two grouped convolutions;
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

from dogo.core.precision import memory_format
from dogo.pipelines.recipe import params as P

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
# Operations on float images on the 0..255 scale, each over the whole batch with per-image numbers.

_AB = (1.0, -0.5, -0.5, 0.0, 1.0, -1.0)  # (alpha, beta) = (r - (g + b) / 2, g - b) as a 1x1 convolution


def hue(x: torch.Tensor, shift: torch.Tensor, ab_weights=None, table=None) -> torch.Tensor:
    """torchvision's adjust_hue (through HSV): rotate each pixel's hue by `shift` turns, keep its max and min.

    With M, m the pixel's max and min channel and C = M - m, torchvision's hsv_to_rgb gives channel n as
    M - C ramp((n + 6h) mod 6). The hue h follows from a = alpha / C and the sign of beta, where alpha = r - (g + b)/2
    and beta = g - b: for g >= b (the upper half of the hexagon) 6h = 1.5 - 2a + clamp(a, -1/2, 1/2), and
    6 - that for g < b. The rotated ramp is read from a 13-knot table with linear interpolation (grid_sample), which
    is exact because the ramp is linear between integer knots.
    """
    k, _, h, w = x.shape
    ab_weights = constant(_AB, (2, 3, 1, 1), x.device, x.dtype) if ab_weights is None else ab_weights
    table = _hue_table(x.device) if table is None else table
    m, big = torch.aminmax(x, dim=1, keepdim=True)
    chroma = torch.sub(big, m).clamp_min_(_EPS)
    alpha, beta = F.conv2d(x, ab_weights).split(1, dim=1)
    # a + 3/2 in float32 (a dimensioned float32 operand makes the result float32): float16 would cost a grey level
    a = torch.addcdiv(constant((1.5,), (1, 1, 1, 1), x.device, torch.float32), alpha, chroma)
    u = a.clamp(1, 2).add_(a, alpha=-2).copysign_(beta)  # 3 - 6h
    # the table's x coordinate in [-1, 1] for the rotated hue 6h + 6 shift, which lies in [-3, 9]
    gx = torch.add(shift.view(-1, 1, 1, 1), u, alpha=-1 / 6)
    grid = gx.view(k, h, w, 1).expand(k, h, w, 2)  # y = x: the table's rows are equal
    ramp = F.grid_sample(table.expand(k, -1, -1, -1), grid, mode="bilinear",
                         padding_mode="border", align_corners=True)
    return torch.addcmul(big, chroma, ramp, value=-1, out=torch.empty_like(x))


def affine(x: torch.Tensor, maps: torch.Tensor, mean_maps: torch.Tensor) -> torch.Tensor:
    """x' = clamp(M_i x_i + K_i mean(x_i), 0, 255) per image, x (n, 3, P) flat pixels: brightness, contrast and
    saturation (torchvision's _blend and its clamp), one batched matrix product over the pixels. The identity
    (M = I, K = 0) gives back every pixel bit for bit."""
    bias = torch.bmm(mean_maps, x.mean(dim=2, keepdim=True))
    return torch.baddbmm(bias, maps, x).clamp_(0, 255)


def gaussian_blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable blur, one 1-D kernel per image and channel ((n * c, size), the impulse for images left sharp), with
    reflect padding (torchvision's): two grouped convolutions over the whole batch."""
    n, c, h, w = x.shape
    size = kernels.shape[1]
    pad = size // 2
    y = F.pad(x.view(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernels.view(n * c, 1, 1, size), groups=n * c)
    y = F.conv2d(y, kernels.view(n * c, 1, size, 1), groups=n * c)
    return y.view(n, c, h, w)


# ---------------------------------------------------------------------------------------------------------------
# The batch as one: every operation runs on the whole batch with per-image numbers (identity where an image's coin
# says no), so a view costs the same fixed, small number of launches whichever images draw which operation.
#
# Brightness, contrast and saturation are per-image affine maps of RGB (contrast's offset is the image's mean luma),
# and torchvision clamps to the range after each. Each image's order puts up to three of them before its hue and up
# to three after it, so six affine stages around one hue stage hold every order with its clamps: the operations
# before the hue are right-aligned to stages 0-2, those after it left-aligned to stages 3-5; an image takes the
# identity at the stages it does not use, and an identity stage leaves its pixels bit for bit.

STAGES = 6
PRE_HUE = 3  # stages 0-2 come before the hue, 3-5 after


def _affine_matrices(op: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n,) operations and factors -> (n, 3, 3) M and K of the blend x' = M x + K mean(x): brightness f I;
    contrast f I and (1 - f) 1 w^T (w the luma weights: the blend towards the mean luma); saturation
    f I + (1 - f) 1 w^T (the blend towards each pixel's own luma)."""
    n = len(op)
    eye, towards_grey = np.eye(3), np.ones((3, 1)) * np.asarray(GREY)[None, :]
    m = f[:, None, None] * eye[None]
    k = np.zeros((n, 3, 3))
    blend = (1 - f)[:, None, None] * towards_grey[None]
    m[op == SATURATION] += blend[op == SATURATION]
    k[op == CONTRAST] = blend[op == CONTRAST]
    return m, k


@dataclass
class Plan:
    """One view's recipe as numbers, made on the host before the device starts (no device-to-host reads)."""
    maps: np.ndarray  # (STAGES, n, 3, 3) M of each affine stage (the identity where an image takes none)
    mean_maps: np.ndarray  # (STAGES, n, 3, 3) K: the stage's offset as a map of the image's mean colour
    hue_shift: np.ndarray  # (n,) turns; 0 where no hue
    flags: np.ndarray  # (3, n) 1.0 or 0.0: hue, solarise, blur
    gray: np.ndarray  # (n, 3, 3) the identity, or 1 w^T for the images turned grey
    sigma: np.ndarray  # (n,) blur sigma of the blurred images

    def __len__(self) -> int:
        return self.hue_shift.shape[0]


def plan(p: P.ViewParams) -> Plan:
    n = len(p)
    rows = np.arange(n)
    maps = np.broadcast_to(np.eye(3), (STAGES, n, 3, 3)).copy()
    mean_maps = np.zeros((STAGES, n, 3, 3))
    hue_at = np.argmax(p.order == HUE, axis=1)
    for slot in range(4):
        op = p.order[:, slot]
        stage = np.where(slot < hue_at, PRE_HUE - hue_at + slot, PRE_HUE + slot - hue_at - 1)
        take = p.jitter & (op != HUE)
        m, k = _affine_matrices(op, p.factors[rows, np.minimum(op, SATURATION)])
        maps[stage[take], rows[take]] = m[take]
        mean_maps[stage[take], rows[take]] = k[take]
    gray = np.broadcast_to(np.eye(3), (n, 3, 3)).copy()
    gray[p.gray] = np.ones((3, 1)) * np.asarray(GREY)[None, :]
    hue = p.jitter & (p.factors[:, HUE] != 0)
    return Plan(maps, mean_maps, np.where(hue, p.factors[:, HUE], 0.0),
                np.stack([hue, p.solarize, p.blur]).astype(np.float64), gray, p.sigma)


def blur_kernels(sigma: np.ndarray, blurred: np.ndarray, size: int) -> np.ndarray:
    """(n, size) normalised 1-D Gaussian kernels as torchvision's _get_gaussian_kernel1d (float32 arithmetic);
    the unit impulse for the images not blurred, which leaves them bit for bit."""
    half = (size - 1) * 0.5
    xs = np.linspace(-half, half, size, dtype=np.float32)
    kernel = np.exp(np.float32(-0.5) * np.square(xs[None, :] / sigma[:, None].astype(np.float32)))
    kernel /= kernel.sum(axis=1, keepdims=True)
    impulse = np.zeros(size, dtype=np.float32)
    impulse[size // 2] = 1
    return np.where(blurred[:, None], kernel, impulse[None, :])


class DeviceRecipe:
    """The recipe on the device for one view of a batch.

    recipe.plan(params) -> Plan, on the host; recipe.apply(uint8 crops, plan) -> normalised views, in the batch's
    order, in the training dtype and memory format; recipe(crops, params) does both.

    A fixed number of launches for any batch and any draw: the plan's numbers go to the device in one copy, and
    every operation runs on the whole batch (tests/test_augment.py holds the op and byte budgets). No host
    synchronisation, no loop over images.
    """

    def __init__(self, recipe, image_size: int, device: torch.device, dtype: torch.dtype, channels_last: bool,
                 work: torch.dtype | None = None, compile: bool = False):
        self.recipe, self.device, self.dtype = recipe, device, dtype
        self.work = work or work_dtype(device)
        self.memory_format = memory_format(channels_last)
        self.blur_size = blur_kernel_size(image_size, recipe.blur_kernel_fraction)
        std = np.asarray(recipe.std, dtype=np.float64)
        # (x / 255 - mean) / std as x * scale + shift
        self.scale = constant(tuple(1 / (255 * std)), (1, 3, 1, 1), device, self.work)
        self.shift = constant(tuple(-np.asarray(recipe.mean) / std), (1, 3, 1, 1), device, self.work)
        self.ab_weights, self.hue_table = constant(_AB, (2, 3, 1, 1), device, self.work), _hue_table(device)
        # which stages can change a pixel at all: known from the config alone, so the op count stays fixed
        self.jitter = recipe.jitter_p > 0
        self.gray = recipe.grayscale_p > 0
        self.blur = recipe.blur_p > 0
        self.solarize = recipe.solarize_p > 0
        # precision.compile: the whole view's chain fused by torch.compile (one compilation: the shapes are fixed)
        self._colour = torch.compile(self.colour) if compile else self.colour

    plan = staticmethod(plan)

    def __call__(self, images: torch.Tensor, p: P.ViewParams) -> torch.Tensor:
        return self.apply(images, plan(p))

    def _numbers(self, the_plan: Plan) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The plan's numbers on the device in one copy: the colour maps and blur kernels in the work dtype, split
        per stage (views); the hue shifts (float32: the hue needs the precision); the flags as booleans."""
        n, c, k = len(the_plan), 3, self.blur_size
        kernels = blur_kernels(the_plan.sigma, the_plan.flags[2] > 0, k) if self.blur else np.zeros((n, k))
        work = [the_plan.maps, the_plan.mean_maps, the_plan.gray[None], np.repeat(kernels, c, axis=0)]
        flat = np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in work]
                              + [the_plan.hue_shift.astype(np.float32), the_plan.flags.astype(np.float32).reshape(-1)])
        split = [a.size for a in work]
        matrices, hue_shift, flags = to_device(flat, self.device).split([sum(split), n, 3 * n])
        matrices = matrices.to(self.work).split(split)
        stages = matrices[0].view(STAGES, n, 3, 3).unbind() + matrices[1].view(STAGES, n, 3, 3).unbind()
        on = flags.view(3, n, 1, 1, 1) > 0
        return [*stages, matrices[2].view(n, 3, 3), matrices[3].view(n * c, k)], hue_shift, on

    def apply(self, images: torch.Tensor, the_plan: Plan, out: torch.Tensor | None = None) -> torch.Tensor:
        """images: (n, 3, S, S) uint8 (or 0..255 float), in the batch's order; out: where the views go (the view's
        rows of its group's tensor), else a new tensor."""
        n = images.shape[0]
        if out is None:
            out = torch.empty(images.shape, dtype=self.dtype, device=self.device, memory_format=self.memory_format)
        if n == 0:
            return out
        matrices, hue_shift, flags = self._numbers(the_plan)
        return self._colour(images, matrices, hue_shift, flags, out)

    def colour(self, images, matrices, hue_shift, flags, out) -> torch.Tensor:
        n, c, h, w = images.shape
        maps, mean_maps, (gray, kernels) = matrices[:STAGES], matrices[STAGES:2 * STAGES], matrices[2 * STAGES:]
        hue_on, solarize_on, _ = flags.unbind()
        x = images.to(self.work, memory_format=torch.contiguous_format).view(n, c, h * w)
        if self.jitter:
            for stage in range(STAGES):
                if stage == PRE_HUE:
                    x = self._hue(x.view(n, c, h, w), hue_shift, hue_on).view(n, c, h * w)
                x = affine(x, maps[stage], mean_maps[stage])
        if self.gray:  # the luma in every channel, or the identity: in range, so no clamp
            x = torch.bmm(gray, x)
        x = x.view(n, c, h, w)
        if self.blur:
            x = gaussian_blur(x, kernels)
        if self.solarize:
            x = torch.where((x >= 127.5) & solarize_on, 255 - x, x)
        return torch.addcmul(self.shift, x, self.scale, out=out)

    def _hue(self, x: torch.Tensor, shift: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        """The hue rotation of the images that draw one; the others bit for bit."""
        return torch.where(on, hue(x, shift, self.ab_weights, self.hue_table), x)


def normalise(x: torch.Tensor, recipe, dtype: torch.dtype, channels_last: bool, buffers=None) -> torch.Tensor:
    """uint8 or 0..255 float images -> (x / 255 - mean) / std in the training dtype and memory format (evaluation
    images, and the views that the workers made); the output from `buffers` (a base.ReusedBuffers) if given."""
    std = np.asarray(recipe.std, dtype=np.float64)
    fmt = memory_format(channels_last)
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


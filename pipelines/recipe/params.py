"""The recipe's random parameters, drawn per image from counter-based streams keyed by (run seed, epoch, image,
view).

Every backend and both placements (augment.place: device or workers) draw an image's parameters from the same
stream, so a run's augmentations do not depend on the world size, the number of workers, where the recipe runs or
the order of a batch: the parameters of image i in epoch e, view v are a pure function of (seed, e, i, v). They are
drawn on the host, where they are tiny; knowing on the host which images take which operation lets the device
recipe run each operation only on those images, with no device-to-host synchronisation.

The stream is SplitMix64 (Steele et al. 2014) over a key that hashes its parts in turn: vectorised over images in
numpy, and small enough to run per image in a worker.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment (the golden ratio in 64 bits)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)

# Slots of each view's stream: one uniform each, then the crop's tries.
FLIP, JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, ORDER, GRAY, BLUR, SIGMA, SOLARIZE = (
    0, 1, 2, 3, 4, 5, 6, 10, 11, 12, 13)  # ORDER takes 4 slots: 6..9
CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes, then falls back to a central crop
CROP = 14  # CROP_TRIES x 4 slots: area, log-ratio, top, left
SLOTS = CROP + 4 * CROP_TRIES


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 whose output bits each depend on every input bit."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def stream_keys(seed: int, epoch: int, images, view: int) -> np.ndarray:
    """(n,) uint64 keys, one per image, of the streams for (seed, epoch, image, view)."""
    with np.errstate(over="ignore"):
        z = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + _GAMMA)
        for part in (np.uint64(epoch), np.uint64(view)):
            z = _mix(z ^ (part * _GAMMA + _GAMMA))
        return _mix(z ^ (np.asarray(images, dtype=np.uint64).reshape(-1) * _GAMMA + _GAMMA))


def uniforms(keys: np.ndarray, start: int, count: int) -> np.ndarray:
    """(n, count) float64 uniforms in [0, 1): slots start .. start + count - 1 of each key's stream."""
    with np.errstate(over="ignore"):
        counter = (np.arange(start, start + count, dtype=np.uint64) + np.uint64(1)) * _GAMMA
        bits = _mix(keys.reshape(-1, 1) + counter.reshape(1, -1))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # the top 53 bits, as numpy's random()


@dataclass
class ViewParams:
    """One view's parameters for n images, on the host (numpy, one row per image)."""
    flip: np.ndarray  # bool
    jitter: np.ndarray  # bool: colour jitter at all
    factors: np.ndarray  # (n, 4) float: brightness, contrast and saturation factors, hue shift (turns)
    order: np.ndarray  # (n, 4) int: the order of the four jitter operations, a permutation of 0..3
    gray: np.ndarray  # bool
    blur: np.ndarray  # bool
    sigma: np.ndarray  # float
    solarize: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.flip)


def draw(recipe, keys: np.ndarray) -> ViewParams:
    """The recipe's parameters from each key's stream: rates by comparison with a uniform, factors uniform in
    [1 - s, 1 + s] and hue in [-h, h] (torchvision's ColorJitter, whose factors cannot go below 0), the jitter order
    a uniformly random permutation, sigma uniform in the recipe's range."""
    u = uniforms(keys, 0, CROP)

    def factor(slot: int, strength: float) -> np.ndarray:
        lo = max(0.0, 1 - strength)
        return lo + (1 + strength - lo) * u[:, slot]

    lo, hi = recipe.blur_sigma
    return ViewParams(
        flip=u[:, FLIP] < recipe.flip_p,
        jitter=u[:, JITTER] < recipe.jitter_p,
        factors=np.stack([factor(BRIGHTNESS, recipe.brightness), factor(CONTRAST, recipe.contrast),
                          factor(SATURATION, recipe.saturation), (2 * u[:, HUE] - 1) * recipe.hue], axis=1),
        order=np.argsort(u[:, ORDER:ORDER + 4], axis=1, kind="stable"),
        gray=u[:, GRAY] < recipe.grayscale_p,
        blur=u[:, BLUR] < recipe.blur_p,
        sigma=lo + (hi - lo) * u[:, SIGMA],
        solarize=u[:, SOLARIZE] < recipe.solarize_p,
    )


def crop_boxes(keys: np.ndarray, heights, widths, scale, ratio) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params for each image, from its stream: (n, 4) int (left, top, w, h).

    Ten tries, each an area in scale x the image's area and a log-uniform aspect ratio; the first box that fits
    wins; if none does, the central crop at the nearest allowed ratio. Vectorised: every try is drawn for every
    image (the stream has a slot per try, so an image's box does not depend on the others')."""
    heights = np.broadcast_to(np.asarray(heights, dtype=np.float64), keys.shape)
    widths = np.broadcast_to(np.asarray(widths, dtype=np.float64), keys.shape)
    u = uniforms(keys, CROP, 4 * CROP_TRIES).reshape(-1, CROP_TRIES, 4)
    area = (heights * widths)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.argmax(axis=1)  # the first try that fits
    rows = np.arange(len(keys))
    w, h = w[rows, first], h[rows, first]
    top = np.floor(u[rows, first, 2] * (heights - h + 1))
    left = np.floor(u[rows, first, 3] * (widths - w + 1))
    fw, fh = _central_fallback(widths, heights, ratio)
    ok = fits.any(axis=1)
    box = np.stack([np.where(ok, left, (widths - fw) // 2), np.where(ok, top, (heights - fh) // 2),
                    np.where(ok, w, fw), np.where(ok, h, fh)], axis=1)
    return box.astype(np.int64)


def _central_fallback(widths: np.ndarray, heights: np.ndarray, ratio) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's fallback: the whole image, cut to the nearest allowed aspect ratio."""
    in_ratio = widths / heights
    too_tall, too_wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = np.where(too_tall, widths, np.where(too_wide, np.round(heights * max(ratio)), widths))
    fh = np.where(too_tall, np.round(widths / min(ratio)), heights)
    return fw, fh

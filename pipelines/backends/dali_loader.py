"""DALI backend: each JPEG is read and decoded once, and every view of the recipe is drawn from the decoded image.

Decoding runs on the GPU (`device='mixed'`, the hardware JPEG decoder taking `data.dali.hw_decoder_load` of the
images) or, without one, on the CPU (`device_id=None`: what our machines and CI run). Per view of every group of the
plan, at its group's size and with its own recipe, in DALI: RandomResizedCrop, colour jitter with p (factors drawn
per image; brightness, contrast around the image's mean grey as torchvision does, saturation, hue), grayscale with p,
Gaussian blur with a per-image sigma with p, solarisation with p, then flip, normalisation and the NCHW layout in one
crop_mirror_normalize. Probabilities use DALI's
conditional execution (an op runs only for the images whose coin says so) or, for the jitter, identity factors.
The numbers come from the same recipe object (AugmentConfig) as the other backends. Files that cannot be decoded
are found before DALI sees them (DALI 2.4's CPU decoder can crash on them) and left out, with a report.

Differences from the batched recipe of the other backends, by DALI's ops: the four jitter ops run in one fixed order
(contrast, brightness, then saturation and hue) rather than a random order per image; pixels are clamped once at
the end of each op rather than after every jitter step.

Order, sharding and position are ours (base.Shard), as in the other backends: the reader is given this rank's files
of the epoch, from the resume step, in order, so the epoch length, drop-last and resume behave the same. The
random draws come from DALI's generator, seeded per (run seed, epoch, start step, rank).
"""
from __future__ import annotations

import functools
import os
import multiprocessing as mp
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from dogo.pipelines.recipe.device import blur_kernel_size
from dogo.core.errors import DataError
from dogo.pipelines.base import LoaderSpec, ShardedLoader, ViewBatch, die_with_parent
from dogo.pipelines.imagefolder import scan
from dogo.pipelines.images import DECODE_ERRORS, load_rgb, structural_problem

_READER = "reader"
_PREFETCH = 2  # batches DALI prepares ahead


def _jitter_factor(applied, strength: float):
    """A factor drawn from [max(0, 1 - s), 1 + s] where `applied` is 1, and 1 (no change) where it is 0."""
    if strength == 0:
        return 1.0
    u = fn.random.uniform(range=[max(0.0, 1.0 - strength), 1.0 + strength])
    return 1.0 + applied * (u - 1.0)


def _contrast_brightness(x, contrast, brightness):
    """brightness * (m + contrast * (x - m)), m the image's mean grey, rounded and clamped to uint8 (HWC).

    Written as arithmetic on the images rather than fn.brightness_contrast(contrast_center=m): a named argument must
    live on the CPU, and with the mixed decoder m is a GPU tensor (DALI refuses the graph). Arithmetic keeps it on
    the device, with no per-view copy to the host."""
    if isinstance(contrast, float) and isinstance(brightness, float):
        return x  # both strengths 0: identity
    grey = fn.color_space_conversion(x, image_type=types.RGB, output_type=types.GRAY)
    m = fn.reductions.mean(grey, dtype=types.FLOAT)  # one value per image
    y = brightness * (m + contrast * (fn.cast(x, dtype=types.FLOAT) - m))
    return fn.cast(y, dtype=types.UINT8)  # DALI's cast rounds to nearest and saturates to [0, 255]


def _view(images, size: int, r, out_dtype):
    """One view of the recipe from the decoded images (HWC uint8)."""
    x = fn.random_resized_crop(images, size=[size, size], random_area=list(r.crop_scale),
                               random_aspect_ratio=list(r.crop_ratio), num_attempts=10)
    jitter = fn.cast(fn.random.coin_flip(probability=r.jitter_p), dtype=types.FLOAT)
    x = _contrast_brightness(x, _jitter_factor(jitter, r.contrast), _jitter_factor(jitter, r.brightness))
    hue = jitter * fn.random.uniform(range=[-r.hue, r.hue]) * 360.0 if r.hue else 0.0  # torchvision's: in turns
    x = fn.hsv(x, hue=hue, saturation=_jitter_factor(jitter, r.saturation))
    if fn.random.coin_flip(probability=r.grayscale_p, dtype=types.BOOL):
        x = fn.hsv(x, saturation=0.0)  # DALI's hsv works in YIQ: Y is ITU-R 601 luma, as torchvision's grayscale
    if r.blur_p > 0:
        if fn.random.coin_flip(probability=r.blur_p, dtype=types.BOOL):
            x = fn.gaussian_blur(x, window_size=blur_kernel_size(size, r.blur_kernel_fraction),
                                 sigma=fn.random.uniform(range=list(r.blur_sigma)))
    if r.solarize_p > 0:
        if fn.random.coin_flip(probability=r.solarize_p, dtype=types.BOOL):
            x = fn.cast(x, dtype=types.INT16)
            x = fn.cast(x + (x >= 128) * (255 - 2 * x), dtype=types.UINT8)
    return fn.crop_mirror_normalize(x, dtype=out_dtype, output_layout="CHW",
                                    mean=[255.0 * m for m in r.mean], std=[255.0 * s for s in r.std],
                                    mirror=fn.random.coin_flip(probability=r.flip_p))


@pipeline_def(enable_conditionals=True)
def _views(files: list[str], labels: list[int], plan, decoder: str, hw_decoder_load: float, out_dtype):
    """Every view of the plan from one decode of each image, in the plan's order (group, then set and view): the
    outputs g{g}v{k}, then the label."""
    encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name=_READER)
    extra = {"hw_decoder_load": hw_decoder_load} if decoder == "mixed" else {}
    images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB, **extra)
    return (*[_view(images, g.size, spec.recipe, out_dtype) for g in plan.groups for spec in g.views], label)


def _output_names(plan) -> list[str]:
    return [f"g{g}v{k}" for g, group in enumerate(plan.groups) for k in range(len(group.views))] + ["label"]


def _undecodable(paths: list[str], processes: int, whole: bool) -> list[tuple[str, str]]:
    """Files DALI must not see, with the reason: names DALI's reader cannot take (not UTF-8), files that declare
    more pixels than images.MAX_PIXELS (a decompression bomb: refused from the header, never decoded), files whose
    structure is broken (truncated, foreign, corrupt data: DALI 2.4's CPU decoder can crash the process on them, or
    decode garbage with only a warning) unless PIL decodes them anyway, and with `whole` JPEGs whose decode makes
    libjpeg warn of corrupt data (a zero-filled block breaks no structure: only decoding shows it; at the smallest
    DCT scale, as `dogo convert` checks). In processes (libjpeg's warnings are caught per process)."""
    with mp.get_context("fork").Pool(max(1, processes), initializer=die_with_parent) as pool:
        return [v for v in pool.imap(functools.partial(_verdict, whole=whole), paths, chunksize=256) if v]


def _verdict(path: str, whole: bool) -> tuple[str, str] | None:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return path, "the file name is not valid UTF-8 (DALI's reader cannot open it): rename it"
    problem = structural_problem(path, whole)
    if problem is not None and problem.startswith("declares"):
        return path, problem
    if problem is None and not whole:
        return None
    reason = _decode_error(path, draft_only=problem is None)
    if problem is None:
        return (path, reason) if reason else None
    return (path, f"{problem}; {reason}") if reason else None


def printable(path: str) -> str:
    """A path as text, whatever bytes its name holds (undecodable ones shown as U+FFFD)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _decode_error(path: str, draft_only: bool = False) -> str | None:
    """Why PIL cannot decode the file, or None."""
    try:
        load_rgb(path, draft_only=draft_only)
        return None
    except DECODE_ERRORS as exc:
        return str(exc)


class DALILoader(ShardedLoader):
    """The ViewLoader protocol over an image folder, with DALI doing all the image work."""

    def __init__(self, root: str | Path, spec: LoaderSpec, *, workers: int, hw_decoder_load: float = 0.65,
                 scan_whole: bool = True, labels: str = "folders"):
        index = scan(root, labels=labels)
        # Undecodable files are left out (and reported), as the other backends skip them.
        bad = dict(_undecodable(index.paths, len(os.sched_getaffinity(0)), scan_whole))
        if bad:
            index = index.subset([i for i, p in enumerate(index.paths) if p not in bad])
        self.index = index
        super().__init__(len(index), spec, where=str(root))
        self.num_classes = len(index.classes) or None
        # put on the first batch, so that the run logs them
        self._report = self.note_skipped(index.skipped
                                         + [f"{printable(path)}: {reason}" for path, reason in bad.items()])
        self.workers, self.hw_decoder_load = max(1, workers), hw_decoder_load

    def _pipeline(self, epoch: int, start_step: int):
        rows = self.shard.epoch_indices(epoch, start_step)
        gpu = self.device.type == "cuda"
        seed = int(np.random.SeedSequence([self.seed, epoch, start_step, self.shard.rank])
                   .generate_state(1)[0] & 0x7FFFFFFF)
        pipe = _views(files=[self.index.paths[i] for i in rows], labels=[int(self.index.labels[i]) for i in rows],
                      plan=self.plan, decoder="mixed" if gpu else "cpu", hw_decoder_load=self.hw_decoder_load,
                      out_dtype=types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT,
                      batch_size=self.shard.local_batch, num_threads=self.workers,
                      device_id=(self.device.index or 0) if gpu else None, seed=seed,
                      prefetch_queue_depth=_PREFETCH)
        try:
            pipe.build()
        except RuntimeError as exc:
            raise DataError(f"DALI could not build its pipeline: {_first_line(exc)}") from None
        return pipe

    def batches(self, epoch: int, start_step: int) -> Iterator[ViewBatch]:
        if start_step >= self.steps_per_epoch:
            return
        names = _output_names(self.plan)
        step = start_step
        try:
            # the iterator starts the pipeline (and its prefetching) as it is made
            it = DALIGenericIterator(self._pipeline(epoch, start_step), names, reader_name=_READER,
                                     last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
            for batch, in it:
                groups = [self._group(g, batch) for g in range(len(self.plan.groups))]
                # DALI hands labels over on the CPU: pinned, so that the copy does not block the host
                labels = batch["label"].reshape(-1)
                if self.device.type == "cuda":
                    labels = labels.pin_memory().to(self.device, non_blocking=True)
                yield ViewBatch(groups, labels.long(), skipped=self._report)
                self._report = []
                step += 1
        except RuntimeError as exc:
            raise self._explain(exc, epoch, step) from None

    def _group(self, g: int, batch: dict) -> torch.Tensor:
        """Group g's views, each copied from DALI's output into its rows of the group's tensor (the one copy: dtype
        and memory format on the way)."""
        out, b = self.group_output(g), self.shard.local_batch
        for k in range(len(self.plan.groups[g].views)):
            out[k * b:(k + 1) * b].copy_(batch[f"g{g}v{k}"], non_blocking=True)
        return out

    def _explain(self, exc: RuntimeError, epoch: int, step: int) -> DataError:
        """A DataError naming the undecodable file(s) or the setting to change.

        DALI's decoder error does not name the sample, and a failed pipeline cannot go on, so the files of the
        batches it may have been working on (this one and the prefetched ones) are checked with PIL.
        """
        text = str(exc)
        if "out of memory" in text.lower():
            return DataError(f"DALI ran out of device memory at step {step} of epoch {epoch}: lower "
                             f"data.batch_size or data.dali.hw_decoder_load, or data.workers. DALI said: "
                             f"{_first_line(exc)}")
        if "decoders.image" not in text:
            return DataError(f"DALI failed at step {step} of epoch {epoch}: {_first_line(exc)}")
        bad = []
        for s in range(step, min(step + _PREFETCH + 1, self.steps_per_epoch)):
            for i in self.shard.indices(epoch, s):
                path = self.index.paths[i]
                reason = _decode_error(path)
                if reason:
                    bad.append(f"{path} ({reason})")
        if bad:
            return DataError(f"DALI could not decode {len(bad)} file(s) of epoch {epoch} near step {step}: "
                             f"{'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. Remove or replace them "
                             f"(the folder and ffcv backends skip such files; `dogo convert` reports them all)")
        return DataError(f"DALI could not decode an image of epoch {epoch} near step {step} that PIL reads; "
                         f"DALI said: {' '.join(text.split())[:500]}")


def _first_line(exc: BaseException) -> str:
    """DALI's own reason: the line after 'encountered:', else the first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for before, line in zip(lines, lines[1:]):
        if before.startswith("encountered"):
            return line
    return lines[0] if lines else type(exc).__name__


def make_loader(data, spec: LoaderSpec) -> DALILoader:
    """The registry's entry: the image folder data.path/data.train_split, every view made in DALI (augment.place
    does not apply: DALI keeps its own pipeline)."""
    return DALILoader(Path(data.path) / data.train_split, spec, workers=data.workers,
                      hw_decoder_load=data.dali.hw_decoder_load, scan_whole=data.dali.scan == "whole",
                      labels=data.labels)

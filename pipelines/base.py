"""The protocol every pipeline backend satisfies, and the scaffolding they share: sharding, epoch position, reports.

A loader yields `ViewBatch`es whose views are already on the training device, augmented, normalised, in the
training dtype and memory format, grouped by size as the plan of views says (pipelines/views.py). The engine sees only
this protocol: it never imports a data library. Every backend is built from one `LoaderSpec`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np
import torch

from dogo.core.errors import DataError
from dogo.core.precision import memory_format
from dogo.pipelines.recipe.device import DeviceRecipe, normalise
from dogo.pipelines.views import ViewPlan


def die_with_parent(*_) -> None:
    """In a worker process (a DataLoader worker_init_fn, a converter's writer): die when the process that started it
    dies, even by SIGKILL, so that no orphan goes on holding the run's files (its lock among them) or writing.
    Call it first thing in the worker: until then the worker would outlive its parent."""
    import ctypes
    import multiprocessing
    import signal
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    # the parent died before the signal was armed: this process was handed to init, or to a subreaper (a container's
    # init, systemd --user), whose pid is not 1; a multiprocessing worker knows its parent's pid
    parent = multiprocessing.parent_process()
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent.pid):
        os._exit(1)




@dataclass
class ViewBatch:
    """One step's views, a tensor per group of the plan: groups[g] is (sets * count_g * b, 3, S_g, S_g), rows
    ordered [set][view][image], so that row i of every view is image i of the batch (labels[i]) and a peer's crops of
    a group are one contiguous slice (no copy to hand them out)."""
    groups: list[torch.Tensor]
    labels: torch.Tensor  # (b,) int64 on the device; -1 where the source has no labels
    skipped: list[str] = field(default_factory=list)  # files that could not be decoded (replaced or left out)

    def of_set(self, plan: ViewPlan, s: int) -> list[torch.Tensor]:
        """Set s's views of each group, largest first: (count_g * b, 3, S_g, S_g) slices."""
        return plan.of_set(self.groups, s)

    def large(self, plan: ViewPlan, s: int) -> torch.Tensor:
        """Set s's large (first group's) views: what momentum encoders and a teacher see."""
        return self.of_set(plan, s)[0]


@dataclass(frozen=True)
class LoaderSpec:
    """What every backend's loader is built from, beside the data's own settings (DataConfig)."""
    plan: ViewPlan  # the views per image, by group: sizes, counts, streams and per-view recipes
    recipe: object  # the resolved AugmentConfig: where the recipe runs (place), normalisation, blur kernel size
    global_batch: int  # images per step over all ranks
    seed: int
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # the views' dtype
    channels_last: bool = False
    compile_recipe: bool = False  # precision.compile: the device recipe's chain fused by torch.compile

    @property
    def image_size(self) -> int:
        """The large views' side: the models' input and the evaluation size."""
        return self.plan.groups[0].size


class ViewLoader(Protocol):
    steps_per_epoch: int  # full global batches in one epoch (the last partial batch is dropped)
    images_per_epoch: int
    num_images: int  # in the training split
    num_classes: int | None  # None: unlabelled, or not known to the backend
    where: str  # what it reads, for messages
    skipped: list[str]  # every undecodable file met so far (reported when the run ends)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Position the next iteration at `start_step` of `epoch` (resume restores both)."""

    def __iter__(self) -> Iterator[ViewBatch]: ...

    def __len__(self) -> int:
        """Steps the next iteration yields."""


class EvalSplit(Protocol):
    """A labelled split for kNN and the linear probe: deterministic images (no augmentation), in order."""
    classes: list[str]
    where: str  # what it is, for messages: its folder, or its file and split

    def __len__(self) -> int: ...

    def batches(self, positions: np.ndarray, batch_size: int, device: torch.device, recipe, dtype: torch.dtype,
                channels_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised images on device, labels on device) for `positions`, in order; label -1 marks an image
        that could not be read (left out of every metric)."""


@dataclass(frozen=True)
class Shard:
    """Which rows of each global batch belong to this rank.

    Every epoch has one seeded permutation of the dataset, the same on every rank; global batch s is
    perm[s*B:(s+1)*B] and rank r owns its r-th contiguous slice. A run on W ranks therefore sees exactly the images
    (and, with per-image parameter streams, the augmentations) that one process with the global batch sees.
    """
    num_images: int
    global_batch: int
    rank: int
    world_size: int
    seed: int

    def __post_init__(self):
        if self.global_batch % self.world_size:
            raise DataError(f"data.batch_size={self.global_batch} does not divide over {self.world_size} ranks; "
                            f"use a multiple of {self.world_size}")

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_images // self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_images)

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """permutation(epoch), computed once per epoch (13-18 ms at 1.28 M images: too much for every step)."""
        cached = self.__dict__.get("_cached_permutation")  # a frozen dataclass still has its own __dict__
        if cached is None or cached[0] != epoch:
            cached = (epoch, self.permutation(epoch))
            self.__dict__["_cached_permutation"] = cached
        return cached[1]

    def indices(self, epoch: int, step: int) -> np.ndarray:
        perm = self.epoch_permutation(epoch)
        start = step * self.global_batch + self.rank * self.local_batch
        return perm[start:start + self.local_batch]

    def epoch_indices(self, epoch: int, start_step: int = 0) -> np.ndarray:
        """This rank's rows of every global batch from start_step to the epoch's end, in order."""
        steps = self.steps_per_epoch
        batches = self.epoch_permutation(epoch)[:steps * self.global_batch].reshape(steps, self.global_batch)
        return batches[start_step:, self.rank * self.local_batch:(self.rank + 1) * self.local_batch].reshape(-1)


def prefetched(items: Iterator, depth: int) -> Iterator:
    """The items of `items`, made up to `depth` ahead in a background thread; an exception there is raised here, at
    the item it replaced. Stopping early (a break, a closed generator) lets the thread finish its current item."""
    import queue
    import threading
    done = object()
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    break
                ready.put((item, None))
            if hasattr(items, "close"):  # a generator's clean-up runs here, before the thread ends (not at exit)
                items.close()
        except BaseException as exc:  # handed to the consumer
            ready.put((None, exc))
        ready.put((done, None))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, exc = ready.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                pass


class ReusedBuffers:
    """A loader's output tensors on the CPU, each handed out again once nothing else holds its memory.

    A fresh 224 px view batch in float32 (38 MB at batch 64) is a new mapping from glibc (its allocator maps every
    block over 32 MB anew), and its first write faults in every page: 13 ms per view per batch here, more than
    normalising it. A buffer is reused only when its storage has no user left but this pool: every tensor made
    from a handed-out one (views, autograd's saved inputs, a batch the caller keeps) holds the storage, so kept
    data is never overwritten; when every buffer is held, a new one is made. Elsewhere (CUDA's caching allocator
    reuses memory itself) take() just allocates."""

    def __init__(self, keep: int = 4):
        self.keep = keep  # a loader keeps 3 per group (the batch in use, the one being made, one queued) + 1
        self._buffers: list[torch.Tensor] = []

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
             memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
        shape = tuple(shape)
        for buffer in self._buffers:
            if tuple(buffer.shape) == shape and buffer.dtype == dtype and \
                    buffer.is_contiguous(memory_format=memory_format) and self._unused(buffer):
                return buffer[:]  # a view: while the caller holds it, the storage counts one more user
        buffer = torch.empty(shape, dtype=dtype, memory_format=memory_format)
        self._buffers = (self._buffers + [buffer])[-self.keep:]
        return buffer[:]

    @staticmethod
    def _unused(buffer: torch.Tensor) -> bool:
        # users of the storage: the pool's tensor and the storage object made to ask (torch's private count, as
        # torch's own CUDA-graph memory pool asks it; tests/test_data.py checks what it counts)
        return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) == 2


class ShardedLoader:
    """What every backend's loader shares: this rank's shard of each global batch, the epoch position that
    set_epoch moves (resume), the undecodable files met so far, and the length of the next iteration.

    A backend implements `batches(epoch, start_step)`, yielding the ViewBatches of one epoch from a step."""

    def __init__(self, num_images: int, spec: LoaderSpec, where: str, shard: Shard | None = None):
        if num_images < spec.global_batch:
            raise DataError(f"data.batch_size={spec.global_batch} is larger than the {num_images} images in {where}; "
                            f"lower data.batch_size (the last partial batch of each epoch is dropped)")
        self.shard = shard or Shard(num_images, spec.global_batch, spec.rank, spec.world_size, spec.seed)
        self.spec, self.plan, self.seed = spec, spec.plan, spec.seed
        self.device, self.dtype, self.channels_last = spec.device, spec.dtype, spec.channels_last
        self.num_images, self.where = num_images, where  # for the run's start banner
        self.num_classes: int | None = None  # a backend that knows its labels' classes says how many
        self.steps_per_epoch = self.shard.steps_per_epoch
        self.images_per_epoch = self.steps_per_epoch * spec.global_batch
        self._skipped: dict[str, None] = {}  # "path: reason", each file once (an ordered set)
        self.outputs = ReusedBuffers(keep=3 * len(spec.plan.groups) + 1)  # the views made on a CPU device
        self.recipes: list[DeviceRecipe] | None = None  # a backend whose views the device recipe finishes sets them
        self._epoch, self._start = 0, 0

    @property
    def skipped(self) -> list[str]:
        """Every file skipped so far, each once however many workers and epochs met it."""
        return list(self._skipped)

    def note_skipped(self, entries: list[str]) -> list[str]:
        """Record skipped files; returns those not seen before (what is worth reporting now)."""
        new = [e for e in dict.fromkeys(entries) if e not in self._skipped]
        self._skipped.update(dict.fromkeys(new))
        return new

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self._epoch, self._start = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self._start

    def __iter__(self) -> Iterator[ViewBatch]:
        return self.batches(self._epoch, self._start)

    def batches(self, epoch: int, start_step: int) -> Iterator[ViewBatch]:
        raise NotImplementedError

    def group_output(self, g: int) -> torch.Tensor:
        """Group g's views of one local batch, uninitialised, in the training dtype and memory format (reused
        memory on a CPU device): each view is written into its rows."""
        group, b = self.plan.groups[g], self.shard.local_batch
        return self.outputs.take((len(group.views) * b, 3, group.size, group.size), self.dtype, self.device,
                                 memory_format(self.channels_last))

    def group_from_pixels(self, g: int, pixels: torch.Tensor, plans) -> torch.Tensor:
        """Group g's uint8 views (V, b, S, S, 3) made on the host -> the group's tensor on the device: normalised in
        one pass (augment.place=workers: self.recipes is None), or each view through the group's device recipe
        with its plan (plans[g][v]) into its rows."""
        crops = pixels.to(self.device, non_blocking=True).permute(0, 1, 4, 2, 3)  # (V, b, 3, S, S)
        if self.recipes is None:
            return normalise(crops.flatten(0, 1), self.spec.recipe, self.dtype, self.channels_last, self.outputs)
        out, b = self.group_output(g), crops.shape[1]
        for v, view_plan in enumerate(plans[g]):
            self.recipes[g].apply(crops[v], view_plan, out=out[v * b:(v + 1) * b])
        return out

    def device_recipes(self) -> list[DeviceRecipe]:
        """One device recipe per group: the union of its views' recipes (each view's plan holds its own draws)."""
        return [DeviceRecipe(g.recipe, g.size, self.device, self.dtype, self.channels_last,
                             compile=self.spec.compile_recipe) for g in self.plan.groups]


def endless(loader, batches_of=None):
    """Batches epoch after epoch (benchmarks may need more steps than one epoch holds): `batches_of(loader, epoch)`
    gives an epoch's batches; by default set_epoch then iterate."""
    epoch = 0
    while True:
        if batches_of is None:
            loader.set_epoch(epoch)
            yield from loader
        else:
            yield from batches_of(loader, epoch)
        epoch += 1

"""FFCV backend: batches of views from a .beton file (`dogo convert`).

FFCV's threads read and decode each image once, whole (WholeImageDecoder); right after, on the host, a thread pool
makes every view of every group of the plan from it as the folder backend does (recipe.cpu.write_groups: crop box and
flip from the image's parameter stream, bilinear resize by OpenCV), so both backends give the same views of the same
pixels. With
augment.place=workers the rest of the recipe runs there too, in uint8 (recipe/cpu.py: numba and OpenCV release the
GIL); with augment.place=device the crops are written in the batch's order and the recipe runs
batched on the device (augment.DeviceRecipe). The order is ours, not FFCV's: a TraversalOrder that serves this
rank's rows of each global batch of `Shard`, so every world size sees the same images per step (as the folder
backend) and a resumed run starts at its step. `data.ffcv.order: quasi_random` keeps the global batches random but
reads the file in shuffled blocks of neighbouring samples, for machines whose memory cannot hold the file in the
page cache. The decode buffer holds each image at the .beton's largest size, as FFCV's own decoders' scratch
space does: convert with `--max-resolution` (FFCV's ImageNet recipe uses 512) for large photos."""
from __future__ import annotations

import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import cv2
import numba
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode
from ffcv.loader import Loader
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader
from ffcv.transforms import Squeeze, ToTensor
from ffcv.traversal_order.base import TraversalOrder

from dogo.core.errors import DataError
from dogo.pipelines.base import LoaderSpec, ReusedBuffers, Shard, ShardedLoader, ViewBatch, prefetched
from dogo.pipelines.recipe.cpu import CpuRecipe, draw_views, write_groups
from dogo.pipelines.images import MAX_PIXELS


@dataclass(frozen=True)
class BlockShard(Shard):
    """Shard whose epoch permutation visits shuffled blocks of samples that lie next to each other in the file."""
    by_location: np.ndarray  # sample indices sorted by the offset of their bytes
    block: int  # samples per block

    def permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        blocks = np.array_split(self.by_location, max(1, math.ceil(len(self.by_location) / self.block)))
        return np.concatenate([rng.permutation(blocks[i]) for i in rng.permutation(len(blocks))])


class WholeImageDecoder(SimpleRGBImageDecoder):
    """Each image decoded once, whole, into its row of a (batch, max_h * max_w * 3) uint8 buffer (FFCV's
    SimpleRGBImageDecoder, for images of any size). The crops are ours, made on the host from the images' streams
    as the folder backend makes them (recipe.cpu.crop_and_flip: bilinear, OpenCV): FFCV's RandomResizedCrop
    decoder draws its boxes from its own generator, decodes once per view and resizes with OpenCV's area filter
    (0.4 ms per view on large crops here): with our crops the backend went from 7.2x to 11.1x torchvision
    (benchmarks/results/pipeline_ffcv_workers_cpu2.json)."""

    def declare_state_and_memory(self, previous_state):
        heights, widths = self.metadata["height"], self.metadata["width"]
        shape = (int(heights.max()) * int(widths.max()) * 3,)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                AllocationQuery(shape, np.dtype("<u1")))

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)

        def decode(batch_indices, destination, metadata, storage_state):
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = field["height"], field["width"]
                if field["mode"] == jpg:
                    imdecode_c(image_data, destination[dst_ix], height, width, height, width, 0, 0, 1, 1, False,
                               False)
                else:  # raw pixels: the first 3 h w bytes of the row
                    destination[dst_ix, :image_data.size] = image_data
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


def _stop(epoch_iterator) -> None:
    """Stop FFCV's epoch thread and wait for it. Left to itself, an epoch left early keeps decoding until its queue
    is full, and at the epoch's end it blocks for good putting its end marker into a full queue; a daemon thread
    still running when the interpreter exits is ended as it retakes the GIL inside torch's C++ code, which aborts
    the process ("terminate called without an active exception", exit status 134)."""
    epoch_iterator.iter_ixes = iter(())  # no batch after the one it is making (FFCV 1.0.2: it asks at each batch)
    epoch_iterator.terminate_event.set()
    while epoch_iterator.is_alive():  # take what it still puts, the end marker included, so that no put blocks
        try:
            epoch_iterator.output_queue.get(timeout=0.1)
        except queue.Empty:
            pass
    epoch_iterator.close()  # after the thread: close() releases the memory context the thread reads from


class _ShardOrder(TraversalOrder):
    """FFCV traversal order serving Shard.epoch_indices from the step set by the loader."""

    def __init__(self, shard: Shard):
        self.shard, self.start_step = shard, 0

    def __call__(self, loader):
        # FFCV 1.0.2 accepts a TraversalOrder instance and calls it with the loader (ffcv/loader/loader.py)
        TraversalOrder.__init__(self, loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.shard.epoch_indices(epoch, self.start_step).astype(np.uint64)


@dataclass(frozen=True)
class BetonFields:
    """Which of a .beton's fields hold the image and the label, by name and by position in the writer's order."""
    image: str
    label: str
    names: tuple[str, ...]

    def index(self, name: str) -> int:
        return self.names.index(name)


def open_beton(path: str | Path, image_field: str = "image", label_field: str = "label"
               ) -> tuple[Reader, BetonFields]:
    """The reader of a .beton and its image and label fields (data.ffcv.image_field, data.ffcv.label_field)."""
    from ffcv.fields import IntField, RGBImageField
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.ffcv.beton={path} does not exist; write it with `dogo convert IMAGE_FOLDER {path}`")
    try:
        reader = Reader(str(path))
    except Exception as exc:  # FFCV asserts on a bad header
        raise DataError(f"{path} is not a readable .beton ({type(exc).__name__}: {exc}); convert it again") from None
    names = tuple(reader.field_names)
    for key, name, kind in (("data.ffcv.image_field", image_field, RGBImageField),
                            ("data.ffcv.label_field", label_field, IntField)):
        if name not in names:
            raise DataError(f"{path} has fields {list(names)} but no '{name}'; set {key} to the name of its "
                            f"{kind.__name__} (`dogo convert` writes 'image' and 'label')")
        if not isinstance(reader.handlers[name], kind):
            raise DataError(f"{path}: field '{name}' ({key}) is a {type(reader.handlers[name]).__name__}, "
                            f"not an {kind.__name__}")
    # sizes as declared, before anything is allocated for them (a damaged or crafted file can declare any)
    meta = reader.metadata[f"f{names.index(image_field)}"]
    pixels = meta["height"].astype(np.int64) * meta["width"].astype(np.int64)
    if len(pixels) and pixels.max() > MAX_PIXELS:
        i = int(pixels.argmax())
        raise DataError(f"{path}: sample {i} declares a {int(meta['width'][i])} x {int(meta['height'][i])} image, "
                        f"over the {MAX_PIXELS:,}-pixel limit: the file is damaged or was not written by an image "
                        f"converter; convert the dataset again")
    problem = stored_size_problem(path, reader, meta)
    if problem:
        raise DataError(f"{path}: {problem}: the file is damaged (its images would be read as garbage pixels); "
                        f"convert the dataset again")
    return reader, BetonFields(image_field, label_field, names)


def stored_size_problem(path: Path, reader: Reader, meta: np.ndarray) -> str | None:
    """The first image whose declared size disagrees with its stored bytes, said in words, or None: raw pixels must
    take 3 x width x height bytes, a JPEG's frame header must declare the same width and height (the decoder writes
    each image by its declared size: a mismatch decodes into garbage, without an error). Reads the JPEGs' headers
    only (up to their frame header, a few hundred bytes each)."""
    table = reader.alloc_table
    order = np.argsort(table["ptr"], kind="stable")
    ptrs, sizes = table["ptr"][order].astype(np.int64), table["size"][order].astype(np.int64)
    data_ptr = meta["data_ptr"].astype(np.int64)
    stored = np.full(len(data_ptr), -1, np.int64)  # -1: no allocation starts where the sample says its data is
    if len(ptrs):
        at = np.minimum(np.searchsorted(ptrs, data_ptr), len(ptrs) - 1)
        stored = np.where(ptrs[at] == data_ptr, sizes[at], -1)
    file_bytes = path.stat().st_size
    outside = np.flatnonzero((stored < 0) | (data_ptr + stored > file_bytes))
    if len(outside):
        return f"sample {int(outside[0])}'s image data lies outside the file's allocations"
    heights, widths = meta["height"].astype(np.int64), meta["width"].astype(np.int64)
    raw = meta["mode"] == IMAGE_MODES["raw"]
    wrong = np.flatnonzero(raw & (stored != 3 * heights * widths))
    if len(wrong):
        i = int(wrong[0])
        return (f"sample {i} declares a {widths[i]} x {heights[i]} image ({3 * heights[i] * widths[i]} bytes of raw "
                f"pixels) but stores {stored[i]} bytes")
    jpegs = np.flatnonzero(~raw)
    if not len(jpegs):
        return None
    frames = _jpeg_frame_sizes(np.memmap(path, np.uint8, mode="r"), data_ptr[jpegs], stored[jpegs])
    wrong = np.flatnonzero((frames[:, 0] != heights[jpegs]) | (frames[:, 1] != widths[jpegs]))
    if not len(wrong):
        return None
    i, (h, w) = int(jpegs[wrong[0]]), frames[wrong[0]]
    stores = f"a {w} x {h} JPEG" if h >= 0 else "no JPEG frame header"
    return f"sample {i} declares a {widths[i]} x {heights[i]} image but stores {stores}"


@numba.njit(cache=True, nogil=True)
def _jpeg_frame_sizes(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(height, width) from each JPEG's frame header (SOF0-15 but DHT, JPG and DAC), read within data[start:start +
    length]; (-1, -1) where there is none before the scan."""
    out = np.full((len(starts), 2), -1, np.int64)
    for k in range(len(starts)):
        pos, end = starts[k] + 2, starts[k] + lengths[k]
        if lengths[k] < 4 or data[starts[k]] != 0xFF or data[starts[k] + 1] != 0xD8:
            continue
        while pos + 9 <= end and data[pos] == 0xFF:
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if 0xC0 <= marker <= 0xCF and marker != 0xC4 and marker != 0xC8 and marker != 0xCC:
                out[k, 0] = (np.int64(data[pos + 5]) << 8) | data[pos + 6]
                out[k, 1] = (np.int64(data[pos + 7]) << 8) | data[pos + 8]
                break
            if marker == 0xDA or marker == 0xD9:  # the scan (or the end) before any frame header
                break
            pos += 2 + ((np.int64(data[pos + 2]) << 8) | data[pos + 3])
    return out


class FFCVLoader(ShardedLoader):
    """The ViewLoader protocol over a .beton."""

    def __init__(self, beton: str | Path, spec: LoaderSpec, *, workers: int, order: str = "random",
                 os_cache: bool = True, image_field: str = "image", label_field: str = "label",
                 labels: str = "folders"):
        reader, fields = open_beton(beton, image_field, label_field)
        if labels == "folders":
            _require_labels(beton, reader.metadata[f"f{fields.index(fields.label)}"])
        n = int(reader.num_samples)
        shard = None
        if order == "quasi_random":
            by_location = np.argsort(reader.metadata[f"f{fields.index(fields.image)}"]["data_ptr"], kind="stable")
            shard = BlockShard(n, spec.global_batch, spec.rank, spec.world_size, spec.seed, by_location,
                               max(16 * spec.global_batch, 4096))
        super().__init__(n, spec, where=str(beton), shard=shard)
        if labels == "folders":  # the .beton stores label numbers only: the classes are those it uses
            self.num_classes = len(np.unique(reader.metadata[f"f{fields.index(fields.label)}"]))
        self.recipes = self.device_recipes() if spec.recipe.place == "device" else None
        self._threads = max(1, workers)
        cv2.setNumThreads(1)  # the crops run in our pool, one image per thread at a time
        self._cpu = threading.local()  # one CpuRecipe per group (scratch planes) per thread of the pool
        self._host_buffers = ReusedBuffers(keep=3 * len(self.plan.groups) + 1)  # the uint8 views, on a CPU device
        self._order = _ShardOrder(self.shard)
        sizes = reader.metadata[f"f{fields.index(fields.image)}"]
        self._heights, self._widths = sizes["height"].astype(np.int64), sizes["width"].astype(np.int64)
        pipelines = {name: None for name in fields.names}  # other fields are not read
        pipelines[fields.image] = [WholeImageDecoder(), ToTensor()]
        pipelines[fields.label] = [IntDecoder(), ToTensor(), Squeeze()]
        self._image_first = fields.index(fields.image) < fields.index(fields.label)
        self._loader = Loader(str(beton), batch_size=self.shard.local_batch, num_workers=self._threads,
                              os_cache=os_cache, order=self._order, seed=spec.seed, pipelines=pipelines, drop_last=True)

    def decoded_batches(self, epoch: int, start_step: int) -> Iterator[tuple[int, list[np.ndarray], torch.Tensor]]:
        """(step, the batch's decoded images (h, w, 3) uint8, labels) as FFCV makes them, before any crop. FFCV
        reuses its buffers: the images are valid until the next batch is asked for."""
        # FFCV asks the order for `next_epoch`'s samples when iteration starts (and then counts it up itself)
        self._order.start_step, self._loader.next_epoch = start_step, epoch
        epoch_iterator = iter(self._loader)  # FFCV's EpochIterator: a daemon thread decoding batches ahead
        try:
            for step, pair in enumerate(epoch_iterator, start=start_step):  # fields come in the writer's order
                rows, labels = pair if self._image_first else pair[::-1]
                ids = self.shard.indices(epoch, step)
                rows = rows.numpy()
                images = [rows[k, :3 * h * w].reshape(h, w, 3)
                          for k, (h, w) in enumerate(zip(self._heights[ids], self._widths[ids]))]
                yield step, images, labels
        finally:
            _stop(epoch_iterator)

    def _host_views(self, epoch: int, step: int, images: list[np.ndarray], pool: ThreadPoolExecutor):
        """Every view's crop and flip (and with augment.place=workers the rest of the recipe) on the host, from the
        images' streams, split over the pool's threads (one task per thread, not per image: the pool's own
        overhead runs under the GIL): per group (V, b, S, S, 3) uint8, pinned on CUDA, and the device plans per
        group and view (device placement)."""
        ids = self.shard.indices(epoch, step)
        groups = self.plan.groups
        out = [self._host_block((len(g.views), len(ids), g.size, g.size, 3)) for g in groups]
        on_device = self.recipes is not None
        drawn = [draw_views(g, self.seed, epoch, ids, self._heights[ids], self._widths[ids], on_device)
                 for g in groups]
        pixels = [o.numpy() for o in out]
        sizes = [g.size for g in groups]
        list(pool.map(lambda rows: write_groups(images, rows, drawn, sizes, None if on_device else self._cpu_recipes(),
                                                pixels),
                      np.array_split(np.arange(len(ids)), self._threads)))
        return out, [[view.plan for view in views] for views in drawn] if on_device else None

    def _host_block(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        return self._host_buffers.take(shape, torch.uint8, self.device)

    def _cpu_recipes(self) -> list[CpuRecipe]:
        if not hasattr(self._cpu, "recipes"):
            self._cpu.recipes = [CpuRecipe(g.recipe, g.size) for g in self.plan.groups]
        return self._cpu.recipes

    def _host_batches(self, epoch: int, start_step: int):
        """(host views, plans, labels) per step: FFCV's crops taken out of FFCV's reused buffers before the next
        batch is asked for."""
        with ThreadPoolExecutor(self._threads) as pool:
            for step, images, labels in self.decoded_batches(epoch, start_step):
                host, plans = self._host_views(epoch, step, images, pool)
                yield host, plans, labels.clone()

    def batches(self, epoch: int, start_step: int) -> Iterator[ViewBatch]:
        # the host's part of the next batches runs in a thread while the device trains on this one (numba, OpenCV
        # and numpy's copies release the GIL)
        for host, plans, labels in prefetched(self._host_batches(epoch, start_step), depth=2):
            groups = [self.group_from_pixels(g, block, plans) for g, block in enumerate(host)]
            yield ViewBatch(groups, labels.to(self.device, non_blocking=True).long())


def _require_labels(beton: str | Path, labels: np.ndarray) -> None:
    """data.labels=folders on a .beton converted with --labels none (every label -1) would train the online probe on
    nothing and report chance as its accuracy."""
    if len(labels) and (labels < 0).all():
        raise DataError(f"{beton} holds no labels (every label is -1: it was converted with --labels none) but "
                        f"data.labels=folders; train it with data.labels=none (evaluation during training off: "
                        f"eval.online_probe=off eval.knn_every_epochs=0), or convert the class folders without "
                        f"--labels none")


def make_loader(data, spec: LoaderSpec) -> FFCVLoader:
    """The registry's entry: data.ffcv.beton for training; evaluation reads the image folders under data.path
    (the registry's eval_module)."""
    s = data.ffcv
    if not s.beton:
        raise DataError("data.backend=ffcv needs data.ffcv.beton: the training split converted with "
                        "`dogo convert IMAGE_FOLDER/train OUT.beton`")
    return FFCVLoader(s.beton, spec, workers=data.workers, order=s.order, os_cache=s.os_cache,
                      image_field=s.image_field, label_field=s.label_field, labels=data.labels)

"""`dogo convert SRC DST.beton`: an image-folder tree (ImageNet's train/ or val/) to FFCV's .beton format.

Two passes over the files, both in worker processes:
1. Check: every file is decoded (JPEGs at 1/8 scale through libjpeg's DCT scaling, which still reads the whole
   entropy-coded stream, so truncation and corruption show) and classified as good or bad with a reason.
2. Write: FFCV's DatasetWriter over the good files only. Its workers cannot skip a sample and would hang FFCV's
   progress loop if one raised, so the sample function never raises: should a file that passed the check fail now
   (changed on disk meanwhile), it writes a 1-pixel stand-in, flags it, and the conversion is then discarded with an
   error naming the file.

Every image is stored as the training backends decode it (pipelines.images: upright 8-bit RGB, the same pixels),
huge JPEGs decoded at the smallest DCT scale that still covers --max-resolution. Labels are the sorted
class-folder names' indices.

The .beton is written as DST.partial and renamed when complete; the class list (NAME.classes.json, NAME: DST without .beton)
and the report of skipped files (NAME.report.json) stand beside it.
"""
from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dogo.core.io import atomic_write_text
from dogo.core.errors import DataError
from dogo.pipelines.base import die_with_parent
from dogo.pipelines.imagefolder import scan
from dogo.pipelines.images import TooManyPixels, load_rgb, skip_reason

WRITE_MODES = ("raw", "jpg", "proportion", "smart")


@dataclass(frozen=True)
class ConvertOptions:
    max_resolution: int | None = None  # longer side at most this (FFCV resizes with cv2 INTER_AREA); None: keep
    write_mode: str = "raw"  # FFCV's: raw pixels, jpg, a random `compress_probability` share as jpg, or smart
    jpeg_quality: int = 90
    compress_probability: float = 0.5  # write_mode=proportion
    smart_threshold: int | None = None  # write_mode=smart: images larger than this many raw bytes go as jpg
    num_workers: int = 0  # 0: one per core
    chunk_size: int = 100  # images per unit of work handed to a writer process
    strict: bool = False  # the first bad file is an error that names it
    labels: str = "folders"  # folders: SRC/<class>/<image>; none: every image under SRC at any depth, label -1

    def check(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise DataError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, got {self.write_mode!r}")
        if self.max_resolution is not None and self.max_resolution < 1:
            raise DataError(f"--max-resolution must be a positive number of pixels, got {self.max_resolution}")
        if not 1 <= self.jpeg_quality <= 100:
            raise DataError(f"--jpeg-quality must be within 1..100, got {self.jpeg_quality}")
        if not 0 <= self.compress_probability <= 1:
            raise DataError(f"--compress-probability must be within 0..1, got {self.compress_probability}")
        if self.chunk_size < 1:
            raise DataError(f"--chunk-size must be positive, got {self.chunk_size}")
        if self.labels not in ("folders", "none"):
            raise DataError(f"--labels must be folders or none, got {self.labels!r}")


def _worker_dies_with_parent() -> None:
    """In a writer or checker process: die when the converting process dies (even by SIGKILL), so that no worker
    goes on writing `.partial` and the resource tracker can free the shared memory at once; and leave Ctrl-C to the
    parent, which stops the workers itself (one Ctrl-C, no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the forking thread: now ignored
    die_with_parent()  # not Linux: the parent's own clean-up still runs on Ctrl-C


def _check_one(path: str) -> tuple[str | None, int]:
    """(None, the image's pixel count) when the file decodes; otherwise (a one-line reason, 0)."""
    try:
        if os.path.getsize(path) == 0:
            return "zero-byte file", 0
        load_rgb(path, draft_only=True)
        with Image.open(path) as im:  # the header only: the full size, which the draft decode does not give
            return None, im.size[0] * im.size[1]
    except (TooManyPixels, Image.DecompressionBombError) as exc:
        return f"too many pixels: {exc}", 0
    except Exception as exc:  # any decoder failure is a reason to skip, reported with its message
        return skip_reason(path, exc), 0


class _Samples:
    """What FFCV's writer workers index: (image, label) of the good files; never raises (see the module doc)."""

    def __init__(self, paths: list[str], labels: np.ndarray, max_resolution: int | None):
        self.paths, self.labels, self.max_resolution = paths, labels, max_resolution
        self.failed = mp.get_context("fork").Array("c", 4096)  # the first late failure, shared with the main process

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return load_rgb(self.paths[i], self.max_resolution), int(self.labels[i])
        except Exception as exc:
            with self.failed.get_lock():
                if not self.failed.value:
                    self.failed.value = f"{self.paths[i]}: {type(exc).__name__}: {exc}"[:4000].encode()
            return np.zeros((1, 1, 3), np.uint8), int(self.labels[i])


class _RichProgress:
    """Stands in for the tqdm bar FFCV's writer draws, so that conversion shows images/s and ETA like training."""
    shown: list["_RichProgress"] = []  # bars still drawn: an interrupted conversion takes them down

    def __init__(self, total: int, disable: bool = False, opened: threading.Event | None = None, **_):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn)
        self._t0 = time.perf_counter()
        self._bar = Progress(TextColumn("writing"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(), disable=disable)
        self._task = self._bar.add_task("write", total=total, rate="-")
        self._done = 0
        self._bar.start()
        _RichProgress.shown.append(self)
        if opened is not None:  # FFCV draws its bar once it has started every writer
            opened.set()

    def update(self, n: int) -> None:
        self._done += n
        rate = self._done / max(time.perf_counter() - self._t0, 1e-9)
        self._bar.update(self._task, advance=n, rate=f"{rate:.0f}")

    def close(self) -> None:
        self._bar.stop()
        if self in _RichProgress.shown:
            _RichProgress.shown.remove(self)


def _check_all(paths: list[str], workers: int, strict: bool, log) -> tuple[dict[str, str], int]:
    """Decode every file in a pool: (path -> reason for each bad one, the largest good image's pixel count)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    bad: dict[str, str] = {}
    largest = 0
    with mp.get_context("fork").Pool(workers, initializer=_worker_dies_with_parent) as pool, \
            Progress(TextColumn("checking"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                     disable=log is None) as bar:
        task = bar.add_task("check", total=len(paths))
        for path, (reason, pixels) in zip(paths, pool.imap(_check_one, paths, chunksize=64)):
            bar.advance(task)
            largest = max(largest, pixels)
            if reason is not None:
                if strict:
                    pool.terminate()
                    raise DataError(f"{path}: {reason} (--strict stops at the first bad file; without it such "
                                    "files are skipped and listed in the report)")
                bad[path] = reason
    return bad, largest


def page_size(largest_pixels: int, max_resolution: int | None) -> int:
    """FFCV's page for the largest image stored: FFCV cannot store a sample larger than one page (its default 8 MiB
    refuses a 2000 x 1500 photo as raw pixels), so the page is the smallest power of two that holds the largest
    image raw (a JPEG of it is smaller), and at least FFCV's default. The file's padding grows by at most a page
    per writer process."""
    from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE
    if max_resolution:  # the longer side comes down to max_resolution (the area by its square)
        largest_pixels = min(largest_pixels, max_resolution * max_resolution)
    need = 3 * largest_pixels + (1 << 16)  # RGB bytes, and room for FFCV's per-sample alignment
    size = max(4 * MIN_PAGE_SIZE, 1 << (need - 1).bit_length())
    if size >= MAX_PAGE_SIZE:
        raise DataError(f"the largest image ({largest_pixels:,} pixels) does not fit in one FFCV page "
                        f"(under {MAX_PAGE_SIZE:,} bytes): pass --max-resolution")
    return size


class _WriterWatch:
    """Makes FFCV's writer fail instead of waiting forever for a writer process that died (an error in it, a full
    disk): its processes are kept, each one's exception is kept in shared memory, and FFCV's progress loop, which
    only sleeps while it waits for a count that a dead writer will never raise, checks them between sleeps."""

    def __init__(self):
        import ffcv.writer
        self._ffcv = ffcv.writer
        self.processes: list = []
        self.error = mp.get_context("fork").Array("c", 4096)
        original_job = ffcv.writer.worker_job_indexed_dataset

        def job(*args):
            # first of all, before the writer waits for its first chunk: a writer that waited unarmed when the
            # converter was killed waited for ever (an orphan `dogo convert` process)
            _worker_dies_with_parent()
            try:
                original_job(*args)
            except BaseException as exc:
                with self.error.get_lock():
                    if not self.error.value:
                        self.error.value = " ".join(f"{type(exc).__name__}: {exc}".split())[:4000].encode()
                os._exit(1)  # no traceback per writer: the parent names the cause in one line

        def process(*args, **kwargs):
            p = mp.Process(*args, **kwargs)
            self.processes.append(p)
            return p

        ffcv.writer.worker_job_indexed_dataset, ffcv.writer.Process = job, process
        ffcv.writer.sleep = self.sleep

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
        dead = [p for p in self.processes if p.exitcode not in (None, 0)]
        if dead or self.error.value:
            cause = self.error.value.decode() or f"exit code {dead[0].exitcode} (killed, e.g. for memory?)"
            raise DataError(f"a writer process failed: {cause}")


def sidecar(dst: Path, kind: str) -> Path:
    """NAME.classes.json / NAME.report.json beside NAME.beton (DST without its suffix)."""
    return dst.with_name(dst.stem + f".{kind}.json")


def _interruptible(work, settled: threading.Event | None = None):
    """work()'s result, run (it forks worker processes) in a thread whose SIGINT is blocked, so that the workers
    start with it blocked too (they then ignore it: _worker_dies_with_parent) and one Ctrl-C reaches this process
    alone, as a KeyboardInterrupt in the main thread, which waits here. SETTLED, if given, is set when the thread
    ends."""
    from multiprocessing import resource_tracker
    failure: list[BaseException] = []
    result: list = []
    # The first shared-memory block (FFCV's writer makes one before it forks) starts multiprocessing's resource
    # tracker, and starting it unblocks SIGINT in the calling thread whatever its mask was: started here, from the
    # main thread, it leaves the worker thread's mask alone.
    resource_tracker.ensure_running()

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            result.append(work())
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)
        finally:
            done.set()
            if settled is not None:
                settled.set()

    done = threading.Event()
    threading.Thread(target=run, daemon=True).start()
    # done, not thread.is_alive(): a KeyboardInterrupt inside Thread.join marks a running thread stopped (3.11)
    while not done.wait(timeout=0.1):
        pass
    if failure:
        raise failure[0]
    return result[0]


def _queues_kept_in(queues: list):
    """multiprocessing.Queue for FFCV's writer, each queue kept in QUEUES for _stop_writers."""
    def make_queue():
        queue = mp.Queue()
        queues.append(queue)
        return queue
    return make_queue


def _stop_writers(writer, queues: list) -> None:
    """FFCV's writer processes are not daemons: left running, the interpreter would wait for them at exit. Nor
    would it exit while its work queue's feeder thread still has chunks for the killed writers: those are let go."""
    for bar in list(_RichProgress.shown):
        bar.close()
    for child in mp.active_children():
        child.kill()
        child.join(timeout=5)
    for queue in queues:
        queue.cancel_join_thread()
    shm = getattr(writer, "metadata_sm", None)
    if shm is not None and not isinstance(shm, int):
        shm.close()
        shm.unlink()


def import_ffcv() -> None:
    """Import FFCV for converting (a DataError saying how to install it when it is not installed). Importing FFCV starts numba's TBB
    threading layer, which warns at every fork from a thread other than the main one, and the converter forks from
    one (_interruptible); it runs no parallel kernel, so numba's plain layer is chosen first."""
    try:
        import numba
        numba.config.THREADING_LAYER = "workqueue"
        import ffcv  # noqa: F401
    except ImportError as exc:
        raise DataError(f"dogo convert needs FFCV ({exc}); install it with `pip install dogo[ffcv]` after its system "
                        "packages (apt-get install libturbojpeg0-dev libopencv-dev pkg-config), or run make setup") \
            from None


def _check_destination(dst: Path, overwrite: bool) -> None:
    if dst.suffix != ".beton":
        raise DataError(f"{dst}: the output should end in .beton")
    if dst.exists() and not overwrite:
        raise DataError(f"{dst} already exists; remove it or pass --overwrite")
    if not dst.parent.is_dir():
        raise DataError(f"{dst.parent} does not exist; create the output folder first")


def _write_sidecars(src: Path, dst: Path, index, labels, bad: dict, written: int, options, seconds: float) -> dict:
    """NAME.classes.json (the class list and counts) and NAME.report.json (what was written and left out); the
    report."""
    counts = np.bincount(labels[labels >= 0], minlength=len(index.classes))  # unlabelled (-1): no class
    atomic_write_text(sidecar(dst, "classes"), json.dumps(
        {"classes": index.classes, "images_per_class": counts.tolist(), "source": str(src)}, indent=1) + "\n")
    left_out = [*index.unlisted, *bad.items()]  # what the scan could not list, then what did not decode
    report = {"source": str(src), "output": str(dst), "images_written": written, "skipped": len(left_out),
              "skipped_files": [{"path": p, "reason": r} for p, r in left_out], "seconds": round(seconds, 2),
              "options": {k: getattr(options, k) for k in options.__dataclass_fields__}}
    atomic_write_text(sidecar(dst, "report"), json.dumps(report, indent=1) + "\n")
    return report


def convert(src: str | Path, dst: str | Path, options: ConvertOptions = ConvertOptions(), overwrite: bool = False,
            log=print) -> dict:
    """Convert; returns the report (also written beside the output)."""
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    import ffcv.writer

    options.check()
    src, dst = Path(src), Path(dst)
    _check_destination(dst, overwrite)
    index = scan(src, labels=options.labels)
    workers = options.num_workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    bad, largest = _interruptible(lambda: _check_all(index.paths, workers, options.strict, log))
    good = [i for i, p in enumerate(index.paths) if p not in bad]
    if not good:
        raise DataError(f"{src}: none of its {len(index)} files could be decoded; see the reasons with --strict")
    paths = [index.paths[i] for i in good]
    labels = index.labels[good]

    partial = dst.with_name(dst.name + ".partial")
    partial.unlink(missing_ok=True)  # a previous interrupted run's leftovers
    fields = {"image": RGBImageField(write_mode=options.write_mode, max_resolution=options.max_resolution,
                                     smart_threshold=options.smart_threshold, jpeg_quality=options.jpeg_quality,
                                     compress_probability=options.compress_probability),
              "label": IntField()}
    samples = _Samples(paths, labels, options.max_resolution)
    writers_started = threading.Event()  # or the writing thread ended
    ffcv.writer.tqdm = functools.partial(_RichProgress, disable=log is None, opened=writers_started)
    queues: list = []
    ffcv.writer.Queue = _queues_kept_in(queues)
    _WriterWatch()
    writer = DatasetWriter(str(partial), fields, num_workers=workers,
                           page_size=page_size(largest, options.max_resolution))
    try:
        _interruptible(lambda: writer.from_indexed_dataset(samples, chunksize=options.chunk_size),
                       settled=writers_started)
    except BaseException as exc:  # Ctrl-C (KeyboardInterrupt) or a failure: stop the writers, leave nothing behind
        # a Ctrl-C can come while FFCV starts its writers one by one: the clean-up waits until it has started them
        # all (milliseconds), so that none starts after it and runs on
        writers_started.wait(timeout=30)
        _stop_writers(writer, queues)
        partial.unlink(missing_ok=True)
        if isinstance(exc, DataError):
            raise DataError(f"{dst}: {exc}; nothing was written") from None
        raise
    if samples.failed.value:
        partial.unlink(missing_ok=True)
        raise DataError(f"{samples.failed.value.decode()} -- this file decoded in the check pass but not while "
                        "writing (changed on disk?); nothing was written, run the conversion again")
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    report = _write_sidecars(src, dst, index, labels, bad, len(paths), options, time.perf_counter() - t0)
    os.replace(partial, dst)
    left_out = report["skipped_files"]
    if log is not None:
        log(f"wrote {len(paths)} images of {len(index.classes)} classes to {dst} in {report['seconds']:.0f} s; "
            f"skipped {len(left_out)} file(s), listed in {sidecar(dst, 'report')}")
    return report


"""Stored images to device-resident two-view batches. One module per backend (pipelines/backends/), one protocol
(base.TwoViewLoader), and the registry below: adding a backend is its module (with `make_loader` and, if it has
labelled images of its own, `open_eval_split`), one entry here, and its settings dataclass if it has settings (the
config's data.<name> sub-section)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

import torch

from dogo.engine.errors import DataError, Registry
from dogo.pipelines.base import EvalSplit, TwoViewBatch, TwoViewLoader

__all__ = ["BACKENDS", "EvalSplit", "TwoViewBatch", "TwoViewLoader", "build_loader", "held_bytes", "open_eval_split"]


@dataclass
class FFCVSettings:
    beton: str = ""  # the training split as a .beton (dogo convert); evaluation still reads data.path
    order: Literal["random", "quasi_random"] = "random"  # quasi_random reads the file in shuffled blocks
    os_cache: bool = True  # read through the OS page cache (False: FFCV's own process cache)
    image_field: str = "image"  # the .beton's RGB image field (stock FFCV scripts may write e.g. 'img')
    label_field: str = "label"  # its integer label field (e.g. 'target')


@dataclass
class DALISettings:
    hw_decoder_load: float = 0.65  # on a GPU: share of the JPEGs given to the hardware decoder
    # before the first batch every file is checked (DALI can crash or train on garbage on a broken file).
    # whole: every byte read and every JPEG decoded at 1/8 scale in processes (corrupt data found, also what breaks
    # no structure); ends: the first 64 kB and the last bytes, nothing decoded (truncation and declared size only: a
    # much faster start on a dataset already checked, e.g. by dogo convert)
    scan: Literal["whole", "ends"] = "whole"


@dataclass
class SyntheticSettings:
    images: int = 2048  # dataset size (random pixels, for speed tests)


@dataclass(frozen=True)
class Backend:
    module: str  # defines make_loader(data, **common) and, unless eval_module says otherwise, open_eval_split
    labelled: bool  # has labelled evaluation images (kNN monitor, linear probe)
    extra: str | None = None  # the pip extra that installs the library it needs
    settings: type | None = None  # its config sub-section (data.<name>)
    eval_module: str | None = None  # the module whose open_eval_split reads its evaluation images
    unlabelled_training: bool = False  # trains from images without labels (data.labels=none)
    holds_split: bool = False  # keeps its training split on the device (its module's held_bytes(data) says how much)


_FOLDER = "dogo.pipelines.backends.folder"
BACKENDS: Registry[Backend] = Registry("data backend")
BACKENDS.register("folder", Backend(_FOLDER, labelled=True, unlabelled_training=True))
BACKENDS.register("held", Backend("dogo.pipelines.backends.held", labelled=True, holds_split=True))
BACKENDS.register("ffcv", Backend("dogo.pipelines.backends.ffcv_loader", labelled=True, extra="ffcv",
                                  settings=FFCVSettings, eval_module=_FOLDER, unlabelled_training=True))
BACKENDS.register("dali", Backend("dogo.pipelines.backends.dali_loader", labelled=True, extra="dali",
                                  settings=DALISettings, eval_module=_FOLDER, unlabelled_training=True))
BACKENDS.register("synthetic", Backend("dogo.pipelines.backends.synthetic", labelled=False,
                                       settings=SyntheticSettings))


def _import(backend_name: str, module: str):
    backend = BACKENDS.get(backend_name, "data.backend")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if backend.extra is None:
            raise
        raise DataError(f"data.backend={backend_name} needs the {backend.extra} extra ({exc}); run make setup, or "
                        f"pip install -e '.[{backend.extra}]'") from None


def build_loader(data, recipe, *, n_views: int, seed: int, rank: int, world_size: int, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, compile_recipe: bool = False) -> TwoViewLoader:
    """The training loader that `data.backend` names (data: DataConfig; recipe: the resolved AugmentConfig, whose
    `place` says where the recipe after the crop runs; compile_recipe: precision.compile)."""
    if recipe.place not in ("device", "workers"):
        raise ValueError(f"augment.place={recipe.place!r} is not resolved: load the config with "
                         f"dogo.engine.config.load or resolve() it first")
    backend = BACKENDS.get(data.backend, "data.backend")
    return _import(data.backend, backend.module).make_loader(
        data, image_size=data.image_size, global_batch=data.batch_size, n_views=n_views, recipe=recipe,
        place=recipe.place, seed=seed, rank=rank, world_size=world_size, device=device,
        dtype=dtype, channels_last=channels_last, compile_recipe=compile_recipe)


def open_eval_split(data, split: str, workers: int) -> EvalSplit:
    """A labelled split for kNN and the linear probe, from the backend's own evaluation images."""
    backend = BACKENDS.get(data.backend, "data.backend")
    if not backend.labelled:
        raise DataError(f"data.backend={data.backend} has no labelled images to evaluate on; set "
                        f"eval.knn_every_epochs=0 or train on a backend with labels "
                        f"({', '.join(n for n, b in BACKENDS.items() if b.labelled)})")
    return _import(data.backend, backend.eval_module or backend.module).open_eval_split(data, split, workers)


def held_bytes(data) -> int:
    """Bytes the backend keeps on the training device for the whole run (its held training split; the memory
    estimate counts them), 0 for a backend that streams its images; DataError when the split cannot be read."""
    backend = BACKENDS.get(data.backend, "data.backend")
    return _import(data.backend, backend.module).held_bytes(data) if backend.holds_split else 0

"""Stored images to device-resident two-view batches. One module per backend, one protocol (base.TwoViewLoader),
and the registry below: adding a backend is its module (with `make_loader` and `open_eval_split`) and one line."""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass

import torch

from dogo.pipelines.base import DataError, EvalSplit, TwoViewBatch, TwoViewLoader

__all__ = ["BACKENDS", "DataError", "EvalSplit", "TwoViewBatch", "TwoViewLoader", "backend_named", "build_loader",
           "open_eval_split", "recipe_place"]


@dataclass(frozen=True)
class Backend:
    module: str  # defines make_loader(data, **common) and open_eval_split(data, split, workers)
    labelled: bool  # has labelled evaluation images (kNN monitor, linear probe)
    extra: str | None = None  # the pip extra that installs the library it needs


BACKENDS = {
    "folder": Backend("dogo.pipelines.folder", labelled=True),
    "cifar": Backend("dogo.pipelines.cifar", labelled=True),
    "ffcv": Backend("dogo.pipelines.ffcv_loader", labelled=True, extra="ffcv"),
    "dali": Backend("dogo.pipelines.dali_loader", labelled=True, extra="dali"),
    "synthetic": Backend("dogo.pipelines.synthetic", labelled=False),
}


def backend_named(name: str) -> Backend:
    if name in BACKENDS:
        return BACKENDS[name]
    near = difflib.get_close_matches(str(name), list(BACKENDS), n=1, cutoff=0.4)
    raise DataError(f"data.backend: {name!r} is not one of {', '.join(BACKENDS)}"
                    + (f"; did you mean '{near[0]}'?" if near else ""))


def _module(name: str):
    backend = backend_named(name)
    try:
        return importlib.import_module(backend.module)
    except ImportError as exc:
        if backend.extra is None:
            raise
        raise DataError(f"data.backend={name} needs the {backend.extra} extra ({exc}); run make setup, or "
                        f"pip install -e '.[{backend.extra}]'") from None


def recipe_place(place: str, device: torch.device) -> str:
    """augment.place: where the recipe after the crop runs. auto: on the device when it is a GPU; in the loader's
    workers on CPUs, where the device is the same cores as the model and per-image uint8 work is cheaper."""
    if place == "auto":
        return "device" if device.type == "cuda" else "workers"
    return place


def build_loader(data, recipe, *, n_views: int, seed: int, rank: int, world_size: int, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, compile_recipe: bool = False) -> TwoViewLoader:
    """The training loader that `data.backend` names (data: DataConfig; recipe: AugmentConfig; compile_recipe:
    precision.compile)."""
    return _module(data.backend).make_loader(
        data, image_size=data.image_size, global_batch=data.batch_size, n_views=n_views, recipe=recipe,
        place=recipe_place(recipe.place, device), seed=seed, rank=rank, world_size=world_size, device=device,
        dtype=dtype, channels_last=channels_last, compile_recipe=compile_recipe)


def open_eval_split(data, split: str, workers: int) -> EvalSplit:
    """A labelled split for kNN and the linear probe, from the backend's own evaluation images."""
    if not backend_named(data.backend).labelled:
        raise DataError(f"data.backend={data.backend} has no labelled images to evaluate on; set "
                        f"eval.knn_every_epochs=0 or train on a backend with labels "
                        f"({', '.join(n for n, b in BACKENDS.items() if b.labelled)})")
    return _module(data.backend).open_eval_split(data, split, workers)

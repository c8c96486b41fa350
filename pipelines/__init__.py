"""Stored images to device-resident batches of views, as the plan of views says (views.py). One module per backend
(pipelines/backends/), one protocol (base.ViewLoader), one description every loader is built from (base.LoaderSpec),
and the entries below in dogo.core.registry.BACKENDS: adding a backend is its module (with `make_loader(data, spec)`
and, if it has labelled images of its own, `open_eval_split`), one entry here, and its settings, if it
has any, as the config's data.<name> sub-section (engine/config/schema.py)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from dogo.core.errors import ConfigError, DataError
from dogo.core.registry import BACKENDS
from dogo.pipelines.base import EvalSplit, LoaderSpec, ViewBatch, ViewLoader

__all__ = ["EvalSplit", "LoaderSpec", "ViewBatch", "ViewLoader", "build_loader", "describe_data", "held_bytes",
           "open_eval_split"]


@dataclass(frozen=True)
class Backend:
    module: str  # defines make_loader(data, spec) and, unless eval_module says otherwise, open_eval_split
    labelled: bool  # has labelled evaluation images (kNN monitor, linear probe)
    extra: str | None = None  # the pip extra that installs the library it needs
    eval_module: str | None = None  # the module whose open_eval_split reads its evaluation images
    unlabelled_training: bool = False  # trains from images without labels (data.labels=none)
    holds_split: bool = False  # keeps its training split on the device (its module's held_bytes(data) says how much)

    def typical_side(self, data) -> int:
        """The median shorter side of the training images, px (data.image_size=auto), read by the backend's
        module; a ConfigError where it cannot tell."""
        module = importlib.import_module(self.eval_module or self.module)
        if not hasattr(module, "typical_side"):
            raise ConfigError(f"data.image_size=auto: data.backend={data.backend} cannot tell its images' size; "
                              f"set data.image_size")
        return module.typical_side(data)


_FOLDER = "dogo.pipelines.backends.folder"
BACKENDS.register("folder", Backend(_FOLDER, labelled=True, unlabelled_training=True))
BACKENDS.register("held", Backend("dogo.pipelines.backends.held", labelled=True, holds_split=True))
BACKENDS.register("ffcv", Backend("dogo.pipelines.backends.ffcv_loader", labelled=True, extra="ffcv",
                                  eval_module=_FOLDER, unlabelled_training=True))
BACKENDS.register("dali", Backend("dogo.pipelines.backends.dali_loader", labelled=True, extra="dali",
                                  eval_module=_FOLDER, unlabelled_training=True))
BACKENDS.register("synthetic", Backend("dogo.pipelines.backends.synthetic", labelled=False))


def _import(backend_name: str, module: str):
    backend = BACKENDS.get(backend_name, "data.backend")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if backend.extra is None:
            raise
        raise DataError(f"data.backend={backend_name} needs the {backend.extra} extra ({exc}); run make setup, or "
                        f"pip install -e '.[{backend.extra}]'") from None


def build_loader(data, spec: LoaderSpec) -> ViewLoader:
    """The training loader that `data.backend` names (data: DataConfig, whose batch size and image size the spec
    carries: spec.global_batch, the plan's sizes; spec.recipe.place says where the recipe after the crop runs)."""
    if spec.recipe.place not in ("device", "workers"):
        raise ValueError(f"augment.place={spec.recipe.place!r} is not resolved: load the config with "
                         f"dogo.engine.config.load or resolve() it first")
    backend = BACKENDS.get(data.backend, "data.backend")
    return _import(data.backend, backend.module).make_loader(data, spec)


def open_eval_split(data, split: str, workers: int) -> EvalSplit:
    """A labelled split for kNN and the linear probe, from the backend's own evaluation images."""
    backend = BACKENDS.get(data.backend, "data.backend")
    if data.labels == "none":  # its sub-folders are not classes: numbering them would make a meaningless table
        raise DataError(f"data.labels=none: {data.path} has no labels to evaluate on; evaluate on a labelled "
                        f"dataset: data.path=LABELLED data.labels=folders")
    if not backend.labelled:
        raise DataError(f"data.backend={data.backend} has no labelled images to evaluate on; set "
                        f"eval.knn_every_epochs=0 or train on a backend with labels "
                        f"({', '.join(n for n, b in BACKENDS.items() if b.labelled)})")
    return _import(data.backend, backend.eval_module or backend.module).open_eval_split(data, split, workers)


def describe_data(data, needs_val: bool) -> list[str]:
    """Lines counting the splits a run will read (data: DataConfig), opening each as training and evaluation will:
    a DataError names what cannot be read. needs_val: the val split is read too (the kNN monitor, the online probe).
    A backend without a data check says so in its line."""
    backend = BACKENDS.get(data.backend, "data.backend")
    module = _import(data.backend, backend.eval_module or backend.module)
    if not hasattr(module, "describe_split"):
        return [f"data.backend={data.backend}: no data to check"]
    splits = [data.train_split] + ([data.val_split] if needs_val else [])
    unlabelled = {"labels": "none"} if data.labels == "none" else {}  # the training split only (checks.py)
    return [module.describe_split(data.path, split, **unlabelled) for split in splits]


def held_bytes(data) -> int:
    """Bytes the backend keeps on the training device for the whole run (its held training split; the memory
    estimate counts them), 0 for a backend that streams its images; DataError when the split cannot be read."""
    backend = BACKENDS.get(data.backend, "data.backend")
    return _import(data.backend, backend.module).held_bytes(data) if backend.holds_split else 0

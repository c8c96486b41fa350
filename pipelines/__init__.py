"""Stored images to device-resident two-view batches. One module per backend, one protocol (base.TwoViewLoader)."""
from __future__ import annotations

from pathlib import Path

import torch

from dogo.pipelines.base import DataError, EvalSplit, TwoViewBatch, TwoViewLoader

__all__ = ["DataError", "EvalSplit", "TwoViewBatch", "TwoViewLoader", "build_loader", "open_eval_split"]


def build_loader(data, recipe, *, n_views: int, seed: int, rank: int, world_size: int, device: torch.device,
                 dtype: torch.dtype, channels_last: bool) -> TwoViewLoader:
    """The training loader that `data.backend` names (data: DataConfig; recipe: AugmentConfig)."""
    common = dict(image_size=data.image_size, global_batch=data.batch_size, n_views=n_views, recipe=recipe,
                  seed=seed, rank=rank, world_size=world_size, device=device, dtype=dtype,
                  channels_last=channels_last)
    if data.backend == "folder":
        from dogo.pipelines.folder import FolderLoader
        return FolderLoader(Path(data.path) / data.train_split, workers=data.workers, **common)
    if data.backend == "ffcv":
        if not data.beton:
            raise DataError("data.backend=ffcv needs data.beton: the training split converted with "
                            "`dogo convert IMAGE_FOLDER/train OUT.beton`")
        try:
            from dogo.pipelines.ffcv_loader import FFCVLoader
        except ImportError as exc:
            raise DataError(f"data.backend=ffcv needs FFCV ({exc}); install the ffcv extra (make setup)") from None
        return FFCVLoader(data.beton, workers=data.workers, order=data.order, os_cache=data.os_cache,
                          image_field=data.ffcv_image_field, label_field=data.ffcv_label_field, **common)
    if data.backend == "dali":
        try:
            from dogo.pipelines.dali_loader import DALILoader
        except ImportError as exc:
            raise DataError(f"data.backend=dali needs DALI ({exc}); install the dali extra (make setup)") from None
        return DALILoader(Path(data.path) / data.train_split, workers=data.workers,
                          hw_decoder_load=data.dali_hw_decoder_load, **common)
    if data.backend == "cifar":
        from dogo.pipelines.cifar import CifarLoader
        return CifarLoader(data.path, data.train_split, **common)
    if data.backend == "synthetic":
        from dogo.pipelines.synthetic import SyntheticLoader
        return SyntheticLoader(num_images=data.synthetic_images, **common)
    raise DataError(f"data.backend={data.backend!r} is not available; choose folder, cifar, ffcv, dali or synthetic")


def open_eval_split(data, split: str, workers: int) -> EvalSplit:
    """A labelled split for kNN and the linear probe: the CIFAR files for backend cifar, else the image folder
    data.path/split (FFCV and DALI train from their own format but evaluate on the folder). The synthetic backend
    has no labelled images."""
    if data.backend == "cifar":
        from dogo.pipelines.cifar import CifarEvalSplit
        return CifarEvalSplit(data.path, split, data.image_size)
    if data.backend == "synthetic":
        raise DataError("data.backend=synthetic has no labelled images to evaluate on; set eval.knn_every_epochs=0 "
                        "or train on a folder, cifar, ffcv or dali dataset")
    from dogo.pipelines.folder import FolderEvalSplit
    return FolderEvalSplit(Path(data.path) / split, data.image_size, workers)

"""Evaluation of backbone features: extraction, the weighted kNN and its monitor, top-k accuracy, raw pixels; on a
labelled split of any backend that has one (pipelines.open_eval_split). The linear probes are in linear.py.

Features are the backbone's pooled penultimate layer in eval mode (BN running statistics), L2-normalised for kNN.
Under torchrun each rank extracts a strided share of the images and the shares are all-gathered.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dogo.engine.dist.distributed import DistContext, all_gather_rows
from dogo.core.errors import ConfigError, DataError
from dogo.core.precision import Precision
from dogo.pipelines import EvalSplit, open_eval_split


@torch.no_grad()
def extract_features(backbone: nn.Module, split: EvalSplit, positions: np.ndarray, *, batch_size: int, recipe,
                     ctx: DistContext, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (n, D) float32, labels (n,)) for split[positions], on every rank; unreadable images dropped (a
    DataError naming the split when none is left: a result computed from nothing is not a result)."""
    if not len(positions):
        raise DataError(f"{split.where}: no images to evaluate on; check data.path and the split's name")
    w = ctx.world_size
    padded = np.concatenate([positions, np.repeat(positions[-1:], (-len(positions)) % w)])
    mine = padded[ctx.rank::w]
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    # a bar while features are extracted (the main rank, on a terminal), gone when done
    console = Console()
    with Progress(TextColumn("features"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not (ctx.is_main and console.is_terminal)) as bar:
        task = bar.add_task("features", total=math.ceil(len(mine) / batch_size))
        for images, y in split.batches(mine, batch_size, ctx.device, recipe, precision.dtype, precision.channels_last):
            with precision.autocast(ctx.device):
                feats.append(backbone(images).float())
            labels.append(y)
            bar.advance(task)
    backbone.train(was_training)
    f, y = torch.cat(feats), torch.cat(labels)
    if w > 1:
        # rank r holds padded[r::w]; interleave back to the original order, then drop the padding
        f = all_gather_rows(f).view(w, -1, f.shape[1]).transpose(0, 1).reshape(-1, f.shape[1])
        y = all_gather_rows(y).view(w, -1).T.reshape(-1)
        f, y = f[:len(positions)], y[:len(positions)]
    return decodable(f, y, split, len(positions))


def decodable(features: torch.Tensor, labels: torch.Tensor, split: EvalSplit, asked: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of images that could be read (label -1 marks the others); a DataError naming the split when there
    is none (every metric of it would be NaN)."""
    keep = labels >= 0
    if not bool(keep.any()):
        raise DataError(f"{split.where}: none of the {asked} images asked for could be decoded, so there is nothing to "
                        f"evaluate on; check the files, or point data.path (data.val_split, data.train_split) at "
                        f"readable images")
    return features[keep], labels[keep]


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int, temperature: float, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): each of the k nearest bank features votes exp(cos / T) for its class.

    Returns (n, num_classes) scores; bank and queries are L2-normalised inside.
    """
    bank = F.normalize(bank, dim=1)
    k = min(k, bank.shape[0])
    out = []
    for q in F.normalize(queries, dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy (%) of (n, classes) scores for each k of `ks` up to the number of classes (top-5 of 3 classes
    is not asked for): the keys ("top1", ...) say which k were scored. Scores of no image, or scores that are not
    finite, are errors: a NaN is not an accuracy."""
    if not len(labels):
        raise DataError("no labelled image to score: the evaluation split is empty or unreadable")
    if not bool(torch.isfinite(scores).all()):
        raise ConfigError("the evaluation's scores are not finite (NaN or inf), so no accuracy can be given; the "
                          "features or the evaluation's settings made them (eval.knn_temperature, the probe's --lr)")
    ks = [k for k in ks if k <= scores.shape[1]]
    top = scores.topk(max(ks), dim=1).indices
    hits = top == labels.view(-1, 1)
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def bank_positions(n: int, limit: int, seed: int) -> np.ndarray:
    """All positions, or a fixed random subset of `limit` (sorted, for sequential reads)."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


class KnnMonitor:
    """kNN top-1 of backbones on (data.train_split as bank, data.val_split as queries); the val features also serve
    the online probe."""

    def __init__(self, cfg, ctx: DistContext, precision: Precision, workers: int | None = None):
        workers = cfg.data.workers if workers is None else workers
        self.train_split = open_eval_split(cfg.data, cfg.data.train_split, workers)
        self.val_split = open_eval_split(cfg.data, cfg.data.val_split, workers)
        self.bank = bank_positions(len(self.train_split), cfg.eval.knn_bank_images, cfg.seed)
        self.cfg, self.ctx, self.precision = cfg, ctx, precision

    def _features(self, backbone, split, positions):
        return extract_features(backbone, split, positions, batch_size=self.cfg.eval.batch_size,
                                recipe=self.cfg.augment, ctx=self.ctx, precision=self.precision)

    def val_features(self, backbone: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self._features(backbone, self.val_split, np.arange(len(self.val_split)))

    def top1(self, backbone: nn.Module, val: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
        """kNN top-1 (%); `val`: the val split's features when already extracted (the online probe's)."""
        bank, bank_y = self._features(backbone, self.train_split, self.bank)
        queries, y = val if val is not None else self.val_features(backbone)
        scores = knn_predict(bank, bank_y, queries, len(self.train_split.classes), self.cfg.eval.knn_k,
                             self.cfg.eval.knn_temperature)
        return topk_accuracy(scores, y, ks=(1,))["top1"]


@torch.no_grad()
def pixel_features(split: EvalSplit, positions: np.ndarray, *, batch_size: int, recipe, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw-pixels baseline: each normalised evaluation image flattened into one feature vector."""
    feats, labels = [], []
    for images, y in split.batches(positions, batch_size, device, recipe, torch.float32, False):
        feats.append(images.flatten(1))
        labels.append(y)
    return decodable(torch.cat(feats), torch.cat(labels), split, len(positions))

"""The evaluations `dogo eval` runs on saved runs, each as the JSON-ready result it writes: every peer's kNN against
its random initialisation, one peer's linear probe, and the comparison table of several runs with random init and
raw pixels. The command prints and writes them; nothing here prints."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dogo.core.environment import environment
from dogo.core.precision import Precision
from dogo.engine.dist.distributed import DistContext
from dogo.engine.eval.evaluate import KnnMonitor, extract_features
from dogo.engine.eval.linear import fast_probe, probe_batch, standard_probe
from dogo.engine.eval.table import comparison_rows
from dogo.engine.eval.saved import SavedRun
from dogo.pipelines import open_eval_split

FAST_LR = 1e-3  # the fast protocol's AdamW learning rate


def probe_lr(protocol: str, batch_size: int, lr: float | None) -> float:
    """The learning rate a probe uses: the one given, else the protocol's (standard: SGD 0.1 x batch / 256)."""
    if lr is not None:
        return lr
    return 0.1 * batch_size / 256 if protocol == "standard" else FAST_LR


def val_features(run: SavedRun, peer: str, ctx: DistContext, precision: Precision):
    """(features, labels, class names) of the val split through one peer's trained backbone."""
    cfg = run.cfg
    split = open_eval_split(cfg.data, cfg.data.val_split, cfg.data.workers)
    backbone = run.peers(ctx.device, only=peer).peers[peer].backbone
    feats, labels = extract_features(backbone, split, np.arange(len(split)), batch_size=cfg.eval.batch_size,
                                     recipe=cfg.augment, ctx=ctx, precision=precision)
    return feats, labels, split.classes


def knn_report(run: SavedRun, ctx: DistContext, precision: Precision) -> dict:
    """kNN top-1 of every peer's trained backbone and of the same network at its random initialisation (the run's
    own seed), on the run's val split with the training split as the bank."""
    cfg = run.cfg
    monitor = KnnMonitor(cfg, ctx, precision)
    trained, random_init = run.peers(ctx.device), run.peers(ctx.device, trained=False)
    peers = {}
    for name in trained.peers:
        peers[name] = {"arch": cfg.peers[name].arch, "trained": monitor.top1(trained.peers[name].backbone),
                       "random_init": monitor.top1(random_init.peers[name].backbone)}
    return {"evaluation": "knn_top1_vs_random_init", "checkpoint": str(run.path), "step": run.step,
            "config": cfg.name, "data": str(Path(cfg.data.path) / cfg.data.val_split),
            "knn_protocol": cfg.eval.knn_protocol, "k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature,
            "peers": peers, "environment": environment(ctx.device)}


def linear_report(run: SavedRun, peer: str, protocol: str, epochs: int, batch_size: int, lr: float | None,
                  ctx: DistContext, precision: Precision) -> dict:
    """One peer's linear probe by `protocol` (engine/eval/linear.py), top-1 and top-5 on the val split."""
    cfg = run.cfg
    backbone = run.peers(ctx.device, only=peer).peers[peer].backbone
    splits = {name: open_eval_split(cfg.data, name, cfg.data.workers)
              for name in (cfg.data.train_split, cfg.data.val_split)}
    train, val = splits[cfg.data.train_split], splits[cfg.data.val_split]
    note = None
    if protocol == "standard":  # at most the training split (L2: the default 256 on a small folder)
        batch_size, note = probe_batch(batch_size, len(train), ctx.world_size)
    lr = probe_lr(protocol, batch_size, lr)
    if protocol == "standard":
        result = standard_probe(backbone, train, val, recipe=cfg.augment, ctx=ctx, precision=precision,
                                epochs=epochs, batch_size=batch_size, lr=lr, seed=cfg.seed)
    else:
        feats = {name: extract_features(backbone, split, np.arange(len(split)), batch_size=cfg.eval.batch_size,
                                        recipe=cfg.augment, ctx=ctx, precision=precision)
                 for name, split in splits.items()}
        result = fast_probe(*feats[cfg.data.train_split], *feats[cfg.data.val_split], len(train.classes),
                            epochs=epochs, lr=lr, batch_size=batch_size, seed=cfg.seed)
    return {"evaluation": "linear_probe", "protocol": protocol, "epochs": epochs, "batch_size": batch_size,
            **({"batch_note": note} if note else {}), "lr": lr, "checkpoint": str(run.path), "step": run.step, "config": cfg.name, "peer": peer,
            "arch": cfg.peers[peer].arch, "data": str(Path(cfg.data.path)), "train_split": cfg.data.train_split,
            "val_split": cfg.data.val_split, **result, "environment": environment(ctx.device)}


def table_report(runs: list[SavedRun], ctx: DistContext, precision: Precision, epochs: int, protocol: str) -> dict:
    """Every peer of every run, its random init and raw pixels: kNN (the first run's protocol) and linear-probe
    top-1, all on the first run's evaluation splits."""
    first = runs[0].cfg
    rows, val_images = comparison_rows([(r.path, r.state, r.cfg) for r in runs], ctx, precision, epochs, protocol)
    ev = first.eval
    return {"evaluation": "knn_and_linear_probe_top1", "data": first.data.path,
            "train_split": first.data.train_split, "val_split": first.data.val_split, "val_images": val_images,
            "knn_protocol": ev.knn_protocol, "k": ev.knn_k, "temperature": ev.knn_temperature,
            "linear_protocol": protocol, "probe_epochs": epochs, "rows": rows, "environment": environment(ctx.device)}

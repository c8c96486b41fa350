"""The comparison table `dogo eval table` prints: kNN and linear-probe top-1 of every peer of every run, of the same
networks at their random initialisation, and of raw pixels, all on the first run's evaluation splits."""
from __future__ import annotations

import numpy as np

from dogo.engine.dist.distributed import DistContext
from dogo.engine.eval.evaluate import extract_features, knn_and_linear, pixel_features
from dogo.engine.precision import Precision
from dogo.engine.ssl.peers import build_peers
from dogo.pipelines import open_eval_split


def comparison_rows(runs: list[tuple], ctx: DistContext, precision: Precision, probe_epochs: int
                    ) -> tuple[list[dict], int]:
    """(rows, images in the val split). runs: (checkpoint path, checkpoint state, its resolved config) each; the
    first run's data and eval settings are everyone's."""
    first = runs[0][2]
    data, ev = first.data, first.eval
    splits = {name: open_eval_split(data, name, data.workers) for name in (data.train_split, data.val_split)}
    positions = {name: np.arange(len(split)) for name, split in splits.items()}
    num_classes = len(splits[data.train_split].classes)

    def metrics(features_of) -> dict[str, float]:
        train, val = (features_of(splits[n], positions[n]) for n in (data.train_split, data.val_split))
        return knn_and_linear(train, val, num_classes, k=ev.knn_k, temperature=ev.knn_temperature,
                              probe_epochs=probe_epochs, seed=first.seed)

    def of_backbone(backbone):
        return lambda split, pos: extract_features(backbone, split, pos, batch_size=ev.batch_size, recipe=first.augment,
                                                   ctx=ctx, precision=precision)

    rows = [{"model": "raw pixels", **metrics(lambda split, pos: pixel_features(
        split, pos, batch_size=ev.batch_size, recipe=first.augment, device=ctx.device))}]
    seen_init = set()
    for path, state, cfg in runs:
        trained, random_init = build_peers(cfg).to(ctx.device), build_peers(cfg).to(ctx.device)
        for name, peer in trained.peers.items():
            peer.load_state_dict(state["peers"][name])
            p = cfg.peers[name]
            init_key = (p.arch, p.cifar_stem, cfg.seed)
            if init_key not in seen_init:
                seen_init.add(init_key)
                rows.append({"model": f"{p.arch} random init (seed {cfg.seed})", "arch": p.arch,
                             **metrics(of_backbone(random_init.peers[name].backbone))})
            rows.append({"model": f"{cfg.name}/{name}", "arch": p.arch, "objective": cfg.objective.name,
                         "checkpoint": str(path), "step": state["position"]["step"],
                         **metrics(of_backbone(peer.backbone))})
    return rows, len(splits[data.val_split])

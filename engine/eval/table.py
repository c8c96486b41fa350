"""The comparison table `dogo eval table` prints: kNN and linear-probe top-1 of every peer of every run, of the same
networks at their random initialisation, and of raw pixels, all on the first run's evaluation splits."""
from __future__ import annotations

import numpy as np
import torch.nn as nn

from dogo.engine.dist.distributed import DistContext
from dogo.engine.eval.evaluate import extract_features, knn_predict, pixel_features, topk_accuracy
from dogo.engine.eval.linear import fast_probe, probe_batch, standard_probe
from dogo.core.precision import Precision
from dogo.engine.ssl.peers import build_peers
from dogo.pipelines import open_eval_split


def comparison_rows(runs: list[tuple], ctx: DistContext, precision: Precision, probe_epochs: int,
                    protocol: str = "fast") -> tuple[list[dict], int]:
    """(rows, images in the val split). runs: (checkpoint path, checkpoint state, its resolved config) each; the
    first run's data and eval settings are everyone's; `protocol`: the linear probe's (engine.eval.linear)."""
    first = runs[0][2]
    data, ev = first.data, first.eval
    splits = {name: open_eval_split(data, name, data.workers) for name in (data.train_split, data.val_split)}
    positions = {name: np.arange(len(split)) for name, split in splits.items()}
    num_classes = len(splits[data.train_split].classes)

    def metrics(backbone: nn.Module) -> dict[str, float]:
        """kNN (the config's protocol) on cached features, and the linear probe (`protocol`)."""
        def features(name):
            if isinstance(backbone, nn.Flatten):  # raw pixels: in fp32, whatever the autocast dtype
                return pixel_features(splits[name], positions[name], batch_size=ev.batch_size, recipe=first.augment,
                                      device=ctx.device)
            return extract_features(backbone, splits[name], positions[name], batch_size=ev.batch_size,
                                    recipe=first.augment, ctx=ctx, precision=precision)
        train, val = features(data.train_split), features(data.val_split)
        knn = topk_accuracy(knn_predict(*train, val[0], num_classes, ev.knn_k, ev.knn_temperature), val[1], ks=(1,))
        note = None
        if protocol == "fast":
            linear = fast_probe(*train, *val, num_classes, epochs=probe_epochs, seed=first.seed)
        else:
            batch, note = probe_batch(256, len(splits[data.train_split]), ctx.world_size)  # the protocol's 256
            linear = standard_probe(backbone, splits[data.train_split], splits[data.val_split], recipe=first.augment,
                                    ctx=ctx, precision=precision, epochs=probe_epochs, batch_size=batch,
                                    seed=first.seed)
        # top-5 only where there are 5 classes or more (None otherwise)
        return {"knn_top1": knn["top1"], "linear_top1": linear["top1"], "linear_top5": linear.get("top5"),
                **({"linear_note": note} if note else {})}

    rows = [{"model": "raw pixels", **metrics(nn.Flatten())}]
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
                             **metrics(random_init.peers[name].backbone)})
            rows.append({"model": f"{cfg.name}/{name}", "arch": p.arch, "objective": cfg.objective.name,
                         "checkpoint": str(path), "step": state["position"]["step"],
                         **metrics(peer.backbone)})
    return rows, len(splits[data.val_split])

"""`dogo train --dry-run`: everything a run checks before it trains, without training: the config (loaded and
checked by then), the data (each split the run reads opened and counted) and one step's memory per rank for the
given number of ranks (the estimate, against what this machine has)."""
from __future__ import annotations

from dogo.core.precision import Precision
from dogo.engine.config import Config
from dogo.engine.dist.distributed import pick_device
from dogo.engine.run.memory import check_fits
from dogo.pipelines import describe_data


def dry_run(cfg: Config, world_size: int) -> dict:
    """The report: data lines, the memory estimate and whether it fits (check_fits raises ConfigError when it does
    not), as a JSON-ready dict with a `lines` list to print."""
    needs_val = cfg.eval.knn_every_epochs > 0 or cfg.eval.online_probe == "on"
    data_lines = describe_data(cfg.data, needs_val)
    device = pick_device(cfg.device)
    precision = Precision.of(cfg)
    est, limit, warning = check_fits(cfg, world_size, device, precision)
    per_rank = cfg.data.batch_size // world_size
    where = "GPU" if device.type == "cuda" else "CPU"
    memory_line = warning or (f"memory: a training step needs about {est.total / 2 ** 30:.1f} GiB per rank "
                              f"({est.describe()}) of {limit / 2 ** 30:.1f} GiB available on this {where} at "
                              f"{per_rank} images per rank")
    return {
        "estimate": "memory of one training step per rank (dogo.engine.run.memory), before anything runs",
        "config": cfg.name, "world_size": world_size, "batch_per_rank": per_rank,
        "image_size": cfg.data.image_size, "precision": str(precision.dtype),
        "channels_last": precision.channels_last, "total_gib": est.total / 2 ** 30,
        "parts_gib": {k: v / 2 ** 30 for k, v in est.parts.items()}, "data": data_lines,
        "lines": [*(f"data: {line}" for line in data_lines), memory_line,
                  f"{cfg.name}: the config is valid, the data readable, and a step fits; train without --dry-run"],
    }

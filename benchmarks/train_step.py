"""Training-step throughput of the engine: images/s per device, on synthetic batches made on the device.

Untimed warm-up, a device synchronisation around each timed block only, several repeats with median and spread,
and the environment written beside the figures. Two figures: the whole step as training runs it (batch synthesis
and the batched augmentation included) and the engine alone (one prepared batch reused).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch

from dogo.engine.config import Config, to_dict
from dogo.engine.io import atomic_write_text


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": str(device), "machine": platform.machine()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine())
    return env


def _timed(fn, steps: int, repeats: int, device: torch.device, images_per_step: int) -> dict:
    rates = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        rates.append(steps * images_per_step / (time.perf_counter() - t0))
    return {"images_per_s_median": statistics.median(rates), "images_per_s_min": min(rates),
            "images_per_s_max": max(rates), "repeats": rates}


def bench_train(cfg: Config, warmup: int, steps: int, repeats: int) -> dict:
    from dogo.engine.train import Trainer
    trainer = Trainer(cfg)
    device, b = trainer.ctx.device, cfg.data.batch_size // trainer.ctx.world_size
    batches = iter(trainer.loader)
    for _ in range(warmup):
        trainer.step(next(batches).views)
    whole = _timed(lambda: trainer.step(next(batches).views), steps, repeats, device, b)
    fixed = next(batches).views
    engine = _timed(lambda: trainer.step(fixed), steps, repeats, device, b)
    return {
        "benchmark": "train_step",
        "what": "images (each with 2 views per peer) per second per device",
        "config": cfg.name, "peers": {n: p.arch for n, p in cfg.peers.items()},
        "objective": cfg.objective.name, "image_size": cfg.data.image_size, "batch_per_device": b,
        "world_size": trainer.ctx.world_size, "precision": str(trainer.precision.dtype),
        "channels_last": trainer.precision.channels_last,
        "warmup_steps": warmup, "timed_steps": steps,
        "step_with_batch_and_augmentation": whole, "engine_only": engine,
        "environment": environment(device), "resolved_config": to_dict(cfg),
    }


def write(result: dict, out: Path) -> Path:
    import json
    return atomic_write_text(out, json.dumps(result, indent=1) + "\n")

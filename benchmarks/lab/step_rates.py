"""Training images/s of CIFAR configs on this machine, from the held image folder: the figures a CPU study is sized
by. Each config: a Trainer on data.path (the held backend, views made on the device, i.e. here on the CPU), one
untimed step, then `steps` timed steps (the loader's batch included, as training runs them), wall time and the
process's CPU time (all its threads). On a shared machine the wall rate depends on what else runs; the CPU-time rate
(images per CPU-second) does much less, and times the threads it used is the rate on an idle machine at best.

    python -m dogo.benchmarks.lab.step_rates OUT.json --data /work/shared/data/cifar10 \
        --configs configs/cifar10_simclr_r20.yaml "configs/cifar10_simclr_r20.yaml:peers.r20.arch=resnet32" ...
        [--steps 3] [--set key=value ...]

A config may carry overrides of its own after a colon, comma-separated.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from dogo.engine import config as config_mod
from dogo.core.environment import environment
from dogo.core.io import write_json
from dogo.pipelines.base import endless


def step_rate(config: str, overrides: list[str], steps: int) -> dict:
    from dogo.engine.run.trainer import Trainer
    cfg = config_mod.load(config, overrides)
    trainer = Trainer(cfg)
    batches = endless(trainer.loader)
    trainer.step(next(batches))  # untimed: the optimiser's state, the allocator
    load = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.step(next(batches))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    images = steps * cfg.data.batch_size
    return {"config": config, "name": cfg.name, "peers": {n: p.arch for n, p in cfg.peers.items()},
            "objective": cfg.objective.name, "batch": cfg.data.batch_size, "image_size": cfg.data.image_size,
            "timed_steps": steps, "images_per_s": images / wall, "images_per_cpu_s": images / cpu,
            "threads": torch.get_num_threads(), "load_average_1min_before": load,
            "load_average_1min_after": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--data", required=True)
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="an override for every config (repeatable)")
    a = p.parse_args(argv)
    overrides = [f"data.path={a.data}", "eval.knn_every_epochs=0", "log.progress=off", *a.set]
    rows = []
    for entry in a.configs:
        config, _, own = entry.partition(":")
        rows.append(step_rate(config, [*overrides, *filter(None, own.split(","))], a.steps))
        r = rows[-1]
        print(f"{r['name']}: {r['images_per_s']:.1f} images/s, {r['images_per_cpu_s']:.1f} images per CPU-second "
              f"(load {r['load_average_1min_before']:.1f})", flush=True)
        write_json(a.out, {"benchmark": "train_step_rates", "data": a.data, "overrides": overrides, "rows": rows,
                           "environment": environment(torch.device("cpu"))})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

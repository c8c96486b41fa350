"""The recipe and the optimiser step measured on their own: `dogo bench recipe`.

- device recipe (recipe.device.DeviceRecipe) on uint8 crops: bytes moved per image per view as a GPU runs it (float16
  work, counted op by op: benchmarks/traffic.py), and its time per image per view on this machine's device, eager
  and with precision.compile;
- CPU-worker recipe (recipe.cpu.CpuRecipe): time per image per view on one core, crop included;
- the LARS step over the parameters of the ImageNet DoGo peers (ResNet-18 + ResNet-50): time and aten ops;
- with --reference FILE (an earlier device recipe with BatchAugment, e.g. `git show f5eabc4:pipelines/augment.py
  > /tmp/augment_f5eabc4.py`) and --reference-optim FILE (an earlier optimiser module, e.g. `git show
  f5eabc4:engine/optim.py > /tmp/optim_f5eabc4.py`): the same figures for that code, measured in the same run, so
  before and after stand side by side.
"""
from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dogo.engine.config import AugmentConfig
from dogo.core.environment import environment


def _median_seconds(fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"seconds_median": statistics.median(times), "seconds": times}


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _device_recipe(recipe, size, batch, device, compile_, repeats) -> dict:
    from dogo.pipelines.recipe import device as augment, params as P
    rec = augment.DeviceRecipe(recipe, size, device, torch.float32, channels_last=device.type == "cuda",
                               compile=compile_)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    plan = augment.plan(P.draw(recipe, P.stream_keys(0, 0, np.arange(batch), 0)))

    def view() -> None:
        rec.apply(images, plan)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the device's time, not the launches'
    t = _median_seconds(view, repeats, warmup=2)
    from dogo.benchmarks.train_step import OpCounter
    with OpCounter() as ops:
        rec.apply(images, plan)
    return {**t, "seconds_per_image_per_view": t["seconds_median"] / batch, "ops_per_view": len(ops.ops)}


def _reference_recipe(path, recipe, size, batch, repeats) -> dict:
    """An earlier BatchAugment: bytes (its GPU branch, masks over the whole batch) and time on this CPU."""
    from dogo.benchmarks.traffic import ByteCounter
    old = _load(path, "reference_augment")
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    aug = old.BatchAugment(recipe, size, torch.float32, False)
    t = _median_seconds(lambda: aug(images, 1, slice(0, batch), batch), repeats)
    gpu_branch = old.computes_subsets
    old.computes_subsets = lambda device: False
    try:
        aug_gpu = old.BatchAugment(recipe, size, torch.bfloat16, True)
        aug_gpu(images, 1, slice(0, batch), batch)
        with ByteCounter() as counter:
            aug_gpu(images, 1, slice(0, batch), batch)
    finally:
        old.computes_subsets = gpu_branch
    return {"file": path, **t, "seconds_per_image_per_view": t["seconds_median"] / batch,
            "bytes_per_image_per_view": counter.total / batch}


def _cpu_recipe(recipe, size, repeats) -> dict:
    from dogo.pipelines.recipe import params as P
    from dogo.pipelines.recipe.cpu import CpuRecipe
    rec = CpuRecipe(recipe, size)
    image = (np.random.default_rng(0).random((375, 500, 3)) * 255).astype(np.uint8)  # ImageNet's typical size
    out = np.empty((2, size, size, 3), np.uint8)
    n = 100
    keys = [[P.stream_keys(0, 0, [i], v) for v in range(2)] for i in range(n)]
    t = _median_seconds(lambda: [rec.views(image, k, out) for k in keys], repeats)
    return {**t, "seconds_per_image_per_view": t["seconds_median"] / (2 * n),
            "note": "one core: crop and flip, then the recipe (the parameters drawn per image here; the folder "
                    "backend draws them per batch)"}


def _lars(optim_module, repeats) -> dict:
    from dogo.benchmarks.train_step import OpCounter
    from dogo.engine import config as config_mod
    from dogo.engine.ssl.peers import build_peer
    # the peers of the ImageNet DoGo config, whose LARS step this times
    cfg = config_mod.load(Path(__file__).resolve().parents[1] / "configs" / "imagenet_r18_r50.yaml", ["device=cpu"])
    torch.manual_seed(0)
    peers = {name: build_peer(p) for name, p in cfg.peers.items()}
    for module in peers.values():
        for p in module.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    opt = optim_module.build_optimizer(peers, cfg, 512, torch.device("cpu"))
    t = _median_seconds(opt.step, repeats)
    with OpCounter() as ops:
        opt.step()
    return {**t, "ops_per_step": len(ops.ops)}


def bench_recipe(size: int, batch: int, repeats: int, compile_: bool, reference: str | None,
                 reference_optim: str | None, device: torch.device, log=print) -> dict:
    from dogo.benchmarks.traffic import recipe_traffic
    from dogo.engine.run import optim
    recipe = AugmentConfig()  # the ImageNet recipe at `size`
    result = {"benchmark": "recipe", "size": size, "batch": batch, "recipe": vars(recipe), "device": str(device)}
    log("device recipe: bytes per image per view (float16 work, as on a GPU) ...")
    result["device_recipe_traffic_fp16"] = recipe_traffic(recipe, size, batch, torch.float16, torch.bfloat16)
    log(f"  {result['device_recipe_traffic_fp16']['bytes_per_image_per_view'] / 1e6:.2f} MB")
    log("device recipe, eager ...")
    result["device_recipe_eager"] = _device_recipe(recipe, size, batch, device, False, repeats)
    if compile_:
        log("device recipe, precision.compile=on (the first call compiles) ...")
        result["device_recipe_compiled"] = _device_recipe(recipe, size, batch, device, True, repeats)
    log("CPU-worker recipe, one core ...")
    result["cpu_recipe"] = _cpu_recipe(recipe, size, repeats)
    log("LARS step, ResNet-18 + ResNet-50 ...")
    result["lars"] = _lars(optim, repeats)
    if reference:
        log(f"reference recipe {reference} ...")
        result["reference_recipe"] = _reference_recipe(reference, recipe, size, batch, repeats)
    if reference_optim:
        log(f"reference LARS {reference_optim} ...")
        result["reference_lars"] = _lars(_load(reference_optim, "reference_optim"), repeats)
    result["environment"] = environment(device)
    return result

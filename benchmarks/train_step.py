"""Training-step throughput of the engine: images/s per device, on synthetic batches made on the device.

Untimed warm-up, a device synchronisation around each timed block only, several repeats with median and spread,
and the environment written beside the figures. Two figures: the whole step as training runs it (batch synthesis
and the batched augmentation included) and the engine alone (one prepared batch reused). Beside them: the step's
FLOPs per image (torch.utils.flop_counter on one real step), the achieved TFLOP/s, the model FLOP utilisation
(MFU) against the device's dense bf16 peak, and what the host launches for one step: the aten ops it dispatches
and, with CUDA graphs (precision.cuda_graphs=on), the graph replays and the ops each replays. A graphs run also
measures the same step eager (cuda_graphs=off) in the same process, for the comparison.
A multi-crop config (views beyond two large ones) is measured beside its two-view self (the first group's two
views only): images/s and ops per step.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from dogo.benchmarks.launches import launch_text
from dogo.engine.config import Config, to_dict
from dogo.core.environment import environment
from dogo.core.environment import process_bytes
from dogo.pipelines.base import endless


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so longer names come first.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
                    ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0))


def peak_tflops(device_name: str | None) -> float | None:
    """The device's dense bf16 peak from the table above, or None (CPUs, unknown GPUs: pass --peak-tflops)."""
    for key, value in PEAK_BF16_TFLOPS:
        if device_name and key in device_name:
            return value
    return None


class OpCounter:
    """Counts the aten ops dispatched inside the context: what a GPU would launch, give or take fusion."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        counter = self

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops.append(func._schema.name)
                return func(*args, **(kwargs or {}))

        self.ops: list[str] = []
        self._mode = Count()

    def __enter__(self) -> "OpCounter":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def count_flops(fn) -> int:
    """FLOPs of one call of fn (forward and backward matmuls and convolutions, as torch's flop counter counts)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


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


def sync_warnings(fn, device: torch.device) -> list[str] | None:
    """On CUDA, the host synchronisations torch reports (set_sync_debug_mode 'warn') during one call of fn; None on
    other devices, which have no such mode (the tests' host_sync_guard checks the same step on the CPU)."""
    if device.type != "cuda":
        return None
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            sync(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch's own notice that the mode is a prototype is not a synchronisation
    return sorted({str(w.message).splitlines()[0] for w in caught
                   if "synchroniz" in str(w.message) and "debug mode is a prototype" not in str(w.message)})


def _rss() -> int:
    return process_bytes("VmRSS")


def _peak_rss() -> int:
    """This process's resident high-water mark (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    return process_bytes("VmHWM")


def plain_model_step(trainer, batch):
    """The ceiling the engine is held against: the same peers and heads (a copy, so the trainer is untouched), each
    forwarding its views of each size as one batch and backpropagating a trivial loss, then one fused SGD step; no
    objective, no targets, no scaler. What a hand-written loop around the same models would cost."""
    import copy
    model, device = copy.deepcopy(trainer.model), trainer.ctx.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, fused=True)
    def step() -> None:
        with trainer.precision.autocast(device):
            loss = sum(peer(views).float().square().mean() for name, peer in model.peers.items()
                       for views in batch.of_set(model.plan, model.sets[name]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def count_captured_ops(trainer) -> dict:
    """With CUDA graphs: the aten ops of each call of the trainer's device step, kept in the returned dict's
    "last" (after the capture: the ops one replay runs; on a CPU, which captures nothing, those of the body run
    eagerly, the same region). The graph's own kernels cannot be counted from the host; these are their ops."""
    seen = {"last": None}
    body = trainer.graph.body

    def counted(views, labels):
        with OpCounter() as counter:
            out = body(views, labels)
        seen["last"] = len(counter.ops)
        return out
    trainer.graph.body = counted
    return seen


def launches_per_step(trainer, next_batch) -> dict:
    """What the host launches for one step of next_batch() (a loader's batch, made inside the count): the aten ops
    dispatched (the loader's recipe, the host-side settings, the copies into a graph's buffers included) and the
    CUDA graph replays, one launch each (precision.cuda_graphs)."""
    replays = trainer.graph.replays if trainer.graph is not None else 0
    with OpCounter() as ops:
        trainer.step(next_batch())
    replayed = trainer.graph.replays - replays if trainer.graph is not None else 0
    return {"aten_ops": len(ops.ops), "graph_replays": replayed, "host_launches": len(ops.ops) + replayed}


def _bench_step(cfg: Config, warmup: int, steps: int, repeats: int, with_ceiling: bool = True
                ) -> tuple[dict, object]:
    """The whole step as training runs it (the loader's batch included), the engine alone (one batch reused) and,
    with_ceiling, the plain model. With CUDA graphs the warm-up is at least the graph's own (its eager steps and
    the capture)."""
    from dogo.engine.run.graphs import WARMUP_STEPS
    from dogo.engine.run.trainer import Trainer
    trainer = Trainer(cfg)
    device, b = trainer.ctx.device, cfg.data.batch_size // trainer.ctx.world_size
    batches = endless(trainer.loader)
    if trainer.graph is not None:
        trainer.captured_ops = count_captured_ops(trainer)
        warmup = max(warmup, WARMUP_STEPS + 1)
    for _ in range(warmup):
        trainer.step(next(batches))
    timing = {"step_with_batch_and_augmentation": _timed(lambda: trainer.step(next(batches)), steps, repeats,
                                                         device, b)}
    trainer.fixed_batch = next(batches)
    timing["engine_only"] = _timed(lambda: trainer.step(trainer.fixed_batch), steps, repeats, device, b)
    timing["warmup_steps"] = warmup
    if not with_ceiling:
        return timing, trainer
    plain = plain_model_step(trainer, trainer.fixed_batch)
    for _ in range(warmup):
        plain()
    timing["plain_model_ceiling"] = _timed(plain, steps, repeats, device, b)
    del plain
    whole, engine, ceiling = (timing[k]["images_per_s_median"] for k in
                              ("step_with_batch_and_augmentation", "engine_only", "plain_model_ceiling"))
    timing["ratios"] = {"whole_to_engine": whole / engine, "whole_to_ceiling": whole / ceiling,
                        "engine_to_ceiling": engine / ceiling}
    return timing, trainer


# H100 SXM: dense bf16 peak and HBM3 bandwidth (data sheet); ResNet training at MLPerf-grade efficiency reaches
# about 17% of the peak (docs/gpu.md, The FLOP model)
H100 = {"name": "H100 SXM", "peak_tflops": 989.0, "bandwidth_tb_per_s": 3.35, "model_efficiency": 0.17}


def two_view(cfg: Config) -> Config | None:
    """The config with its first group's two views only (its recipes kept), or None where that is the config."""
    (name, first), *others = cfg.views.items()
    if not others and first.count == 2:
        return None
    kept = {k: v for k, v in first.view_recipe.items() if int(k) < 2}
    return dataclasses.replace(cfg, views={name: dataclasses.replace(first, count=2, view_recipe=kept)})


def bench_two_view(cfg: Config, warmup: int, steps: int, repeats: int) -> dict:
    """The whole step of the config's two-view self, as training runs it: images/s and ops per step."""
    from dogo.engine.run.trainer import Trainer
    trainer = Trainer(cfg)
    device, b = trainer.ctx.device, cfg.data.batch_size // trainer.ctx.world_size
    batches = endless(trainer.loader)
    for _ in range(warmup):
        trainer.step(next(batches))
    whole = _timed(lambda: trainer.step(next(batches)), steps, repeats, device, b)
    return {"views": to_dict(cfg)["views"], "step_with_batch_and_augmentation": whole,
            "ops_per_step": launches_per_step(trainer, lambda: next(batches))["aten_ops"]}


def gpu_estimate(flops_per_image: float, recipe_bytes_per_image: float, gpu=H100) -> dict:
    """The step on a GPU from the measured inputs: the model's FLOPs at MLPerf-grade efficiency, plus the device
    recipe's memory traffic for every view of an image at the GPU's bandwidth (unfused eager ops: each pass goes
    through memory)."""
    model_s = flops_per_image / (gpu["peak_tflops"] * 1e12 * gpu["model_efficiency"])
    recipe_s = recipe_bytes_per_image / (gpu["bandwidth_tb_per_s"] * 1e12)
    return {"gpu": gpu, "model_ms_per_1000_images": 1e6 * model_s, "recipe_ms_per_1000_images": 1e6 * recipe_s,
            "images_per_s": 1 / (model_s + recipe_s), "recipe_share": recipe_s / (model_s + recipe_s)}


def bench_train(cfg: Config, warmup: int, steps: int, repeats: int, peak: float | None = None) -> dict:
    """peak: the device's dense peak in TFLOP/s for the MFU (None: looked up by the GPU's name). With a backend
    other than synthetic, the same step on synthetic batches is measured too: the ceiling the input pipeline is
    held against. A multi-crop config: its two-view self beside it (two_view)."""
    from dogo.benchmarks.traffic import recipe_traffic
    rss_before = _rss()
    timing, trainer = _bench_step(cfg, warmup, steps, repeats)
    device, b = trainer.ctx.device, cfg.data.batch_size // trainer.ctx.world_size
    whole = timing["step_with_batch_and_augmentation"]
    fixed = trainer.fixed_batch
    ops_per_replay = trainer.captured_ops["last"] if trainer.graph is not None else None  # before another count
    if trainer.graph is None:
        flops_per_image = count_flops(lambda: trainer.step(fixed)) / b
    else:  # a replay dispatches nothing a counter sees: the captured region, once eagerly (a real step)
        flops_per_image = count_flops(lambda: trainer.graph.body(fixed.groups, fixed.labels)) / b
    batches = endless(trainer.loader)
    launches = launches_per_step(trainer, lambda: next(batches))
    if trainer.graph is not None:
        launches["ops_per_replay"] = ops_per_replay
        launches["graph_eager_steps"] = trainer.graph.eager_steps
        launches["graph_replays_in_all"] = trainer.graph.replays
    syncs = sync_warnings(lambda: trainer.step(next(batches)), device)
    env = environment(device)
    peak = peak if peak is not None else peak_tflops(env["gpu"])
    if device.type == "cuda":  # what the caching allocator handed out, at most
        measured, how = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        measured, how = _peak_rss() - rss_before, "resident-set high-water mark above the process before the trainer"
    tflops = flops_per_image * whole["images_per_s_median"] / 1e12
    # the device recipe's bytes per view at each group's size, and for all the views of an image
    traffic = {g.size: recipe_traffic(g.recipe, g.size, min(b, 64), torch.float16, torch.bfloat16)
               ["bytes_per_image_per_view"] for g in trainer.model.plan.groups}
    recipe_bytes = sum(len(g.views) * traffic[g.size] for g in trainer.model.plan.groups)
    result = {
        "benchmark": "train_step",
        "what": "images (each with its plan's views per peer) per second per device",
        "config": cfg.name, "backend": cfg.data.backend, "peers": {n: p.arch for n, p in cfg.peers.items()},
        "objective": cfg.objective.name, "image_size": cfg.data.image_size, "batch_per_device": b,
        "world_size": trainer.ctx.world_size, "precision": str(trainer.precision.dtype),
        "channels_last": trainer.precision.channels_last,
        "timed_steps": steps, **timing,
        "flops_per_image": flops_per_image, "tflops": tflops, "peak_tflops": peak,
        "mfu": tflops / peak if peak else None, "ops_per_step": launches["aten_ops"],
        "cuda_graphs": cfg.precision.cuda_graphs, "launches_per_step": launches, "sync_warnings": syncs,
        "device_recipe_bytes_per_image_per_view": traffic[cfg.data.image_size],
        "device_recipe_bytes_per_image": recipe_bytes,
        "gpu_estimate": gpu_estimate(flops_per_image, recipe_bytes),
        "memory": {"estimate_bytes": trainer.memory_estimate.total, "measured_peak_bytes": measured,
                   "measured_as": how, "estimate_parts": trainer.memory_estimate.parts},
        "environment": env, "resolved_config": to_dict(cfg),
    }
    graphs = trainer.graph is not None
    two = two_view(cfg)
    del trainer, batches, fixed  # its memory (a graph's pool with it) freed before another trainer is built
    if graphs:
        result["eager"] = eager_comparison(cfg, warmup, steps, repeats, result)
    if two is not None:
        result["two_view"] = bench_two_view(two, warmup, steps, repeats)
    if cfg.data.backend != "synthetic":
        synthetic = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, backend="synthetic"),
                                        eval=dataclasses.replace(cfg.eval, knn_every_epochs=0))
        ceiling, _ = _bench_step(synthetic, warmup, steps, repeats)
        result["synthetic_ceiling"] = ceiling["step_with_batch_and_augmentation"]
        result["ratio_to_synthetic_ceiling"] = (whole["images_per_s_median"]
                                                / ceiling["step_with_batch_and_augmentation"]["images_per_s_median"])
    return result


def eager_comparison(cfg: Config, warmup: int, steps: int, repeats: int, graphs: dict) -> dict:
    """The same step with precision.cuda_graphs=off, measured in the same process after the graphs run: whole step,
    engine only and launches per step, and the graphs run's speed-ups over it."""
    import dataclasses
    eager_cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, cuda_graphs="off"))
    timing, trainer = _bench_step(eager_cfg, warmup, steps, repeats, with_ceiling=False)
    batches = endless(trainer.loader)
    out = {"step_with_batch_and_augmentation": timing["step_with_batch_and_augmentation"],
           "engine_only": timing["engine_only"], "launches_per_step": launches_per_step(trainer, lambda: next(batches))}
    for key in ("step_with_batch_and_augmentation", "engine_only"):
        out[f"graphs_speedup_{key}"] = (graphs[key]["images_per_s_median"]
                                        / timing[key]["images_per_s_median"])
    return out


def summary(result: dict, name: str) -> str:
    """The line `dogo bench train` prints for a result."""
    env = result["environment"]
    w, e, c = (result[k] for k in ("step_with_batch_and_augmentation", "engine_only", "plain_model_ceiling"))
    ratios = result["ratios"]
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (no known peak: --peak-tflops)"
    line = (f"{name} on {env['gpu'] or 'CPU'}: {w['images_per_s_median']:.1f} images/s per device "
            f"(whole step; {e['images_per_s_median']:.1f} engine only; {c['images_per_s_median']:.1f} "
            f"plain-model ceiling; whole/engine {ratios['whole_to_engine']:.3f}, whole/ceiling "
            f"{ratios['whole_to_ceiling']:.3f}, engine/ceiling {ratios['engine_to_ceiling']:.3f}); "
            f"{result['flops_per_image'] / 1e9:.2f} GFLOP per image, {result['tflops']:.3f} TFLOP/s, "
            f"MFU {mfu}, {launch_text(result['launches_per_step'])}; memory estimate "
            f"{result['memory']['estimate_bytes'] / 2 ** 30:.2f} GiB, measured "
            f"{result['memory']['measured_peak_bytes'] / 2 ** 30:.2f} GiB")
    if "eager" in result:
        eager = result["eager"]
        line += (f"; eager (cuda_graphs=off): {eager['step_with_batch_and_augmentation']['images_per_s_median']:.1f} "
                 f"whole, {eager['engine_only']['images_per_s_median']:.1f} engine only, "
                 f"{launch_text(eager['launches_per_step'])}; graphs/eager "
                 f"{eager['graphs_speedup_step_with_batch_and_augmentation']:.2f}x whole, "
                 f"{eager['graphs_speedup_engine_only']:.2f}x engine")
    if "two_view" in result:
        t = result["two_view"]
        line += (f"; its two-view step (the first group's two views): "
                 f"{t['step_with_batch_and_augmentation']['images_per_s_median']:.1f} images/s, "
                 f"{t['ops_per_step']} ops per step")
    if "synthetic_ceiling" in result:
        line += (f"; {result['ratio_to_synthetic_ceiling']:.2f}x the synthetic-data ceiling of "
                 f"{result['synthetic_ceiling']['images_per_s_median']:.1f} images/s")
    return line


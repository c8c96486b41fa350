"""Training-step throughput of the engine: images/s per device, on synthetic batches made on the device.

Untimed warm-up, a device synchronisation around each timed block only, several repeats with median and spread,
and the environment written beside the figures. Two figures: the whole step as training runs it (batch synthesis
and the batched augmentation included) and the engine alone (one prepared batch reused). Beside them: the step's
FLOPs per image (torch.utils.flop_counter on one real step), the achieved TFLOP/s, the model FLOP utilisation
(MFU) against the device's dense bf16 peak, and the aten ops one step dispatches.
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
    return sorted({str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)})


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _rss() -> int:
    return _proc_status("VmRSS")


def _peak_rss() -> int:
    """This process's resident high-water mark (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    return _proc_status("VmHWM")


def _endless(loader):
    """Batches epoch after epoch: a benchmark may need more steps than one epoch holds."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def bench_train(cfg: Config, warmup: int, steps: int, repeats: int, peak: float | None = None) -> dict:
    """peak: the device's dense peak in TFLOP/s for the MFU (None: looked up by the GPU's name)."""
    from dogo.engine.train import Trainer
    rss_before = _rss()
    trainer = Trainer(cfg)
    device, b = trainer.ctx.device, cfg.data.batch_size // trainer.ctx.world_size
    batches = _endless(trainer.loader)
    for _ in range(warmup):
        trainer.step(next(batches).views)
    whole = _timed(lambda: trainer.step(next(batches).views), steps, repeats, device, b)
    fixed = next(batches).views
    engine = _timed(lambda: trainer.step(fixed), steps, repeats, device, b)
    flops_per_image = count_flops(lambda: trainer.step(fixed)) / b
    with OpCounter() as ops:
        trainer.step(next(batches).views)
    syncs = sync_warnings(lambda: trainer.step(next(batches).views), device)
    env = environment(device)
    peak = peak if peak is not None else peak_tflops(env["gpu"])
    if device.type == "cuda":  # what the caching allocator handed out, at most
        measured, how = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        measured, how = _peak_rss() - rss_before, "resident-set high-water mark above the process before the trainer"
    tflops = flops_per_image * whole["images_per_s_median"] / 1e12
    return {
        "benchmark": "train_step",
        "what": "images (each with 2 views per peer) per second per device",
        "config": cfg.name, "peers": {n: p.arch for n, p in cfg.peers.items()},
        "objective": cfg.objective.name, "image_size": cfg.data.image_size, "batch_per_device": b,
        "world_size": trainer.ctx.world_size, "precision": str(trainer.precision.dtype),
        "channels_last": trainer.precision.channels_last,
        "warmup_steps": warmup, "timed_steps": steps,
        "step_with_batch_and_augmentation": whole, "engine_only": engine,
        "flops_per_image": flops_per_image, "tflops": tflops, "peak_tflops": peak,
        "mfu": tflops / peak if peak else None, "ops_per_step": len(ops.ops), "sync_warnings": syncs,
        "memory": {"estimate_bytes": trainer.memory_estimate.total, "measured_peak_bytes": measured,
                   "measured_as": how, "estimate_parts": trainer.memory_estimate.parts},
        "environment": env, "resolved_config": to_dict(cfg),
    }


def write(result: dict, out: Path) -> Path:
    import json
    return atomic_write_text(out, json.dumps(result, indent=1) + "\n")

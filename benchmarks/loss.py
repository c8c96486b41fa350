"""Time (forward plus backward) and peak memory of the contrastive loss: the tiled kernel against the straightforward
gather-with-gradient version, at growing numbers of views.

Each (version, size) runs in a fresh process, so one measurement's allocations never inflate another's peak: forked
from a fork server that imported torch once (a measurement pays its device's start, not another import).
Peak memory is what the loss adds on top of its inputs: on CUDA from the caching allocator's peak counter, on CPU
from the process's resident-set high-water mark (reset through /proc/self/clear_refs just before the loss; glibc
returns large blocks to the system on free, so the mark follows the live tensors).
"""
from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch

from dogo.core.environment import available_bytes, process_bytes
from dogo.engine.config.resolve import auto_tile

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def straightforward_lower_bound(views: int, objective: str) -> int:
    """Bytes the straightforward version must hold at once, at the very least: each peer's masked (2N x 2N) fp32
    logits (saved for backward) plus one unmasked block being built, and for DoGo each peer's (N x N) cross-view
    log-softmax. Its real peak is higher (softmax temporaries, gradients)."""
    peers = 2 if objective == "dogo" else 1
    blocks = (peers + 1) * views * views + (peers * (views // 2) ** 2 if objective == "dogo" else 0)
    return 4 * blocks


def _loss_fn(version: str, zs, objective: str, tile: int):
    from dogo.engine.ssl.contrastive import contrastive_terms
    from dogo.engine.ssl.losses import reference_terms
    taus = (0.1, 0.1) if objective == "dogo" else (0.1,)
    tau_kl = 0.1 if objective == "dogo" else None
    crops = [zs[2 * k:2 * k + 2] for k in range(len(taus))]  # each peer's two views
    if version == "kernel":
        return lambda: contrastive_terms(crops, taus, tau_kl, tile=tile)
    return lambda: reference_terms(crops, taus, tau_kl)


def _measure(version: str, views: int, dim: int, tile: int, objective: str, dtype: str, device: str,
             repeats: int, max_seconds: float, queue) -> None:
    """In a fresh process: peak memory of the first forward+backward, then the time of up to `repeats` of them."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(views)
    n_views = 4 if objective == "dogo" else 2
    zs = [torch.nn.functional.normalize(torch.randn(views // 2, dim, generator=g, device=dev), dim=1)
          .to(DTYPES[dtype]).requires_grad_() for _ in range(n_views)]
    tile = auto_tile(dev, n_views // 2, views // 2) if tile == "auto" else int(tile)  # as objective.tile=auto
    fn = _loss_fn(version, zs, objective, tile)

    def run() -> float:
        for z in zs:
            z.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn().sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    if dev.type == "cuda":
        run()  # CUDA context, cuBLAS workspaces and kernels load outside the measurement
        for z in zs:
            z.grad = None
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        times = [run()]
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        base = process_bytes("VmRSS")
        times = [run()]
        peak = process_bytes("VmHWM") - base
    while len(times) < repeats and sum(times) < max_seconds:
        times.append(run())
    queue.put({"peak_bytes": peak, "seconds_median": statistics.median(times), "seconds": times, "tile": tile})


def _in_fresh_process(*args) -> dict:
    ctx = mp.get_context("forkserver")  # the server imports and never touches a device, so its forks start clean
    ctx.set_forkserver_preload([__name__])
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(*args, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return {"failed": f"the measuring process exited with code {proc.exitcode} (killed for memory?)"}
    return queue.get()


def bench_loss(views: list[int], dim: int, tile: int, objective: str, dtype: str, device: str, repeats: int,
               max_seconds: float, goal_views: int = 65536, log=print) -> dict:
    from dogo.core.environment import environment
    dev = torch.device(device)
    rows = []
    for n in views:
        row = {"views": n, "images": n // 2}
        row["kernel"] = _in_fresh_process("kernel", n, dim, tile, objective, dtype, device, repeats, max_seconds)
        log(f"{n} views: kernel {row['kernel']}")
        need = straightforward_lower_bound(n, objective)
        row["straightforward_lower_bound_bytes"] = need
        if need > 0.9 * available_bytes(dev):
            row["straightforward"] = {"would_not_fit": True, "needs_at_least_bytes": need,
                                      "available_bytes": available_bytes(dev)}
        else:
            row["straightforward"] = _in_fresh_process("straightforward", n, dim, tile, objective, dtype, device,
                                                       repeats, max_seconds)
        log(f"{n} views: straightforward {row['straightforward']}")
        k, s = row["kernel"], row["straightforward"]
        if "peak_bytes" in k and "peak_bytes" in s:
            row["memory_ratio"] = k["peak_bytes"] / s["peak_bytes"]
            row["time_ratio"] = k["seconds_median"] / s["seconds_median"]
        elif "peak_bytes" in k:
            # measured kernel against what the straightforward version would need at the very least
            row["memory_ratio_vs_lower_bound"] = k["peak_bytes"] / need
        rows.append(row)
    return {
        "benchmark": "contrastive_loss",
        "what": "forward+backward of the loss terms over 2N views (world size 1); peak = bytes added above the inputs",
        "objective": objective, "dim": dim, "tile_images": tile, "embedding_dtype": dtype,
        "results": rows, "goal": _goal(rows, goal_views),
        "environment": environment(dev),
    }


def _goal(rows: list[dict], goal_views: int) -> dict:
    """Memory at goal_views at most 1/20 of the straightforward version's; time at most 1.2x wherever both ran."""
    goal: dict = {"memory_ratio_max": 1 / 20, "time_ratio_max": 1.2}
    at = [r for r in rows if r["views"] == goal_views]
    if at:
        r = at[0]
        ratio = r.get("memory_ratio", r.get("memory_ratio_vs_lower_bound"))
        goal["memory_ratio_at_goal_views"] = ratio
        goal["memory_ratio_is_against_lower_bound"] = "memory_ratio" not in r
        goal["memory_met"] = ratio is not None and ratio <= 1 / 20
    timed = {r["views"]: r["time_ratio"] for r in rows if "time_ratio" in r}
    goal["time_ratios"] = timed
    goal["time_met"] = bool(timed) and all(v <= 1.2 for v in timed.values())
    return goal


COLUMNS = ("views", "kernel s", "kernel peak", "straightforward s", "straightforward peak", "memory", "time")


def table_rows(result: dict) -> list[tuple[str, ...]]:
    """The rows of `dogo bench loss`'s table (COLUMNS), one per view count."""
    def gib(x):
        return f"{x / 2 ** 30:.3f} GiB"
    rows = []
    for r in result["results"]:
        k, s = r["kernel"], r["straightforward"]
        rows.append((
            str(r["views"]), f"{k['seconds_median']:.3f}" if "seconds_median" in k else k.get("failed", "-"),
            gib(k["peak_bytes"]) if "peak_bytes" in k else "-",
            f"{s['seconds_median']:.3f}" if "seconds_median" in s else "would not fit",
            gib(s["peak_bytes"]) if "peak_bytes" in s else f">= {gib(r['straightforward_lower_bound_bytes'])}",
            f"{r['memory_ratio']:.4f}" if "memory_ratio" in r else
            (f"<= {r['memory_ratio_vs_lower_bound']:.4f}" if "memory_ratio_vs_lower_bound" in r else "-"),
            f"{r['time_ratio']:.2f}x" if "time_ratio" in r else "-"))
    return rows

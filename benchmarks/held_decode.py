"""How long the held backend takes to read a dataset whole at start: every split of an image folder (or CIFAR's
python format) decoded into memory, per number of decoding processes, each setting timed `repeats` times in
interleaved passes (the files read once first, so that every pass reads from the page cache); the CPU seconds
beside the wall seconds (this process and its decoding processes: on a shared machine the wall time depends on what
else runs).

    python -m dogo.benchmarks.held_decode PATH OUT.json [--splits train val] [--processes 1 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dogo.core.environment import environment
from dogo.core.io import write_json
from dogo.pipelines.heldsplit import read_split


def bench_held_decode(path: str, splits: list[str], processes: list[int], repeats: int) -> dict:
    images = {split: len(read_split(path, split, max(processes))) for split in splits}  # warm: the page cache
    load = os.getloadavg()[0]  # the machine is shared: what else ran
    seconds: dict[int, list[float]] = {p: [] for p in processes}
    cpu: dict[int, list[float]] = {p: [] for p in processes}
    for _ in range(repeats):
        for p in processes:
            start, used = time.perf_counter(), _cpu_seconds()
            for split in splits:
                read_split(path, split, p)
            seconds[p].append(time.perf_counter() - start)
            cpu[p].append(_cpu_seconds() - used)
    total = sum(images.values())
    return {"benchmark": "held_decode", "data": path, "images": images,
            "what": "seconds to read every split whole (decode, one uint8 array per split), median of repeats",
            "by_processes": {str(p): {"seconds": statistics.median(s), "repeats": s,
                                      "images_per_s": total / statistics.median(s),
                                      "cpu_seconds": statistics.median(cpu[p]), "cpu_seconds_repeats": cpu[p],
                                      "images_per_cpu_s": total / statistics.median(cpu[p])}
                             for p, s in seconds.items()},
            "load_average_before": load, "load_average_after": os.getloadavg()[0],
            "environment": environment(torch.device("cpu"))}


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the decoding processes), user and system."""
    import resource
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("out")
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    result = bench_held_decode(a.path, a.splits, a.processes, a.repeats)
    write_json(a.out, result)
    for n, r in result["by_processes"].items():
        print(f"{n} process(es): {r['seconds']:.2f} s, {r['images_per_s']:,.0f} images/s, "
              f"{r['images_per_cpu_s']:,.0f} images per CPU-second")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

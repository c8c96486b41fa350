"""`make demo-check`: the kNN table `make demo` just wrote against the committed result file.

On a CPU the demo pins its kernels and threads (the Makefile's DEMO_ENV), so its table is the same to the printed
two decimals on every run; a difference means the code, the data or a library changed what the demo computes.
Usage: python -m dogo.benchmarks.demo_check NEW_KNN.json COMMITTED_KNN.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def differences(new: dict, committed: dict) -> list[str]:
    """What differs between two kNN result files (knn_top1_vs_random_init), at the printed two decimals."""
    out = []
    if new.get("step") != committed.get("step"):
        out.append(f"step: {new.get('step')} vs committed {committed.get('step')}")
    peers = sorted(set(new.get("peers", {})) | set(committed.get("peers", {})))
    for peer in peers:
        a, b = new.get("peers", {}).get(peer), committed.get("peers", {}).get(peer)
        if a is None or b is None:
            out.append(f"{peer}: only in the {'committed' if a is None else 'new'} file")
            continue
        for key in ("trained", "random_init"):
            if f"{a[key]:.2f}" != f"{b[key]:.2f}":
                out.append(f"{peer} {key}: {a[key]:.2f} vs committed {b[key]:.2f}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("new", type=Path)
    p.add_argument("committed", type=Path)
    args = p.parse_args(argv)
    for path in (args.new, args.committed):
        if not path.is_file():
            print(f"error: {path} does not exist (make demo writes runs/demo/knn.json)")
            return 2
    new, committed = (json.loads(path.read_text()) for path in (args.new, args.committed))
    diff = differences(new, committed)
    if diff:
        print(f"the demo's table differs from {args.committed}:\n  " + "\n  ".join(diff))
        return 1
    gains = ", ".join(f"{n} {r['trained'] - r['random_init']:+.2f}" for n, r in new["peers"].items())
    print(f"the demo's table equals {args.committed} ({gains} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

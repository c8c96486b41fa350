"""Several `dogo` command lines in one interpreter, one after another, so that torch's import and the CUDA start (5
to 10 s a process on a GPU machine) are paid once: how benchmarks/gpu_check.sh runs a step of several commands
under its time limit.

    python -m dogo.in_one_process "train configs/demo.yaml device=cuda" "eval knn runs/demo --json k.json"

Each argument is one command line, split into words as a shell splits them. `mark FILE TEXT` appends the line TEXT
to FILE (the check splits its GPU-utilisation samples per command at such lines). The first command that fails ends
the run with its exit status.
"""
from __future__ import annotations

import gc
import shlex
import sys
from pathlib import Path

from dogo.cli import main as dogo


def run(lines: list[str]) -> int:
    for line in lines:
        words = shlex.split(line)
        if words[:1] == ["mark"] and len(words) >= 3:
            with Path(words[1]).open("a") as f:
                f.write(" ".join(words[2:]) + "\n")
            continue
        status = dogo(words)
        gc.collect()  # the last command's trainer (and a CUDA graph's memory pool) before the next is built
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))

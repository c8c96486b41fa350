"""`python -m dogo.pipelines.check BACKEND PATH [--splits ...]`: read and count a dataset's splits before a long run
starts (make's ImageNet and CIFAR targets run it before torchrun); exit 2 with the reason. A backend that offers the
check has `describe_split(path, split)` and `SPLITS` in its module."""
from __future__ import annotations

import argparse
import importlib

from dogo.core.errors import DataError
from dogo.core.registry import BACKENDS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check a dataset's splits and count them.")
    p.add_argument("backend", help="folder or held")
    p.add_argument("path", help="folder: the root holding train/ and val/; held: that, or CIFAR's cifar-10-batches-py "
                                "folder (its test batch is the val split)")
    p.add_argument("--splits", nargs="+", help="default: the backend's (train val)")
    a = p.parse_args(argv)
    try:
        module = importlib.import_module(BACKENDS.get(a.backend, "backend").module)
        if not hasattr(module, "describe_split"):
            raise DataError(f"the {a.backend} backend has no data check; the folder and held backends do")
        for split in a.splits or module.SPLITS:
            print(module.describe_split(a.path, split))
    except DataError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""pytest's hooks and fixtures; the helpers the tests import are in tests/helpers.py."""
import os
from pathlib import Path

import pytest

from dogo.pipelines.shapes import generate


def pytest_configure(config):
    """Under pytest-xdist, each worker's intra-op threads get an equal share of the cores: a worker per core with
    every worker's default of one thread per core oversubscribes them, and waiting threads spin (3x slower here)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """A tiny procedural dataset: 10 classes, 8 train and 3 val images each, 32 px."""
    return generate(tmp_path_factory.mktemp("data") / "shapes", image_size=32, train_per_class=8,
                    val_per_class=3, seed=1)

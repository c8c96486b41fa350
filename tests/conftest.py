import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dogo.pipelines.shapes import generate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """A tiny procedural dataset: 10 classes, 8 train and 3 val images each, 32 px."""
    return generate(tmp_path_factory.mktemp("data") / "shapes", image_size=32, train_per_class=8,
                    val_per_class=3, seed=1)


def tiny_config(data_path: Path, out_dir: Path, **sections) -> dict:
    """A DoGo config small enough for a CPU test: two ResNet-18 peers on 16 px views, batch 8."""
    cfg = {
        "name": "t", "out_dir": str(out_dir), "seed": 3, "device": "cpu",
        "data": {"backend": "folder", "path": str(data_path), "image_size": 16, "batch_size": 8, "workers": 0},
        "augment": {"blur_p": 0.5},
        "peers": {"a": {"arch": "resnet18", "head_hidden": 32, "head_out": 16, "tau": 0.5},
                  "b": {"arch": "resnet18", "head_hidden": 32, "head_out": 16, "tau": 0.5, "kl_weight": 0.5}},
        "objective": {"name": "dogo"},
        "optim": {"name": "lars", "lr": 0.5},
        "schedule": {"epochs": 1, "warmup_epochs": 0.3, "max_steps": 6},
        "eval": {"knn_every_epochs": 0},
        "log": {"every": 1, "progress": "off"},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.__setitem__(key, value)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_env() -> dict:
    """One thread per process: identical float reductions in every run of a test (bit-exact comparisons)."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_cli(*args, check=True, timeout=600, torchrun_procs: int = 0):
    """Run `dogo ...` in a fresh process (optionally under torchrun with gloo)."""
    env = cli_env()
    if torchrun_procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}",
               "-m", "dogo", *args]
    else:
        cmd = [sys.executable, "-m", "dogo", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc

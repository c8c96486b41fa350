"""The memory estimate before the first step: against the measured peak, too-large runs refused with the batch
that fits (make's ImageNet target included), running out of memory mid-run, and data.workers beyond the cores."""
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dogo.engine import config as config_mod
from dogo.core.precision import Precision
from dogo.engine.run import memory
from dogo.core.errors import ConfigError
from tests.helpers import REPO, cli_env, in_a_process_of_its_own, tiny_config


def _peak_of_two_steps(config: str, overrides: list[str]) -> dict:
    """The estimate, and the resident-memory peak of 2 training steps above what the process held before the
    trainer (VmHWM reset to the resident set first); the second step runs with all the step keeps (optimiser state,
    momentum encoders) allocated."""
    from dogo.core.environment import process_bytes
    from dogo.engine.run.memory import estimate
    from dogo.engine.run.trainer import Trainer
    torch.set_num_threads(1)  # as the CLI tests' processes (cli_env)
    cfg = config_mod.load(config, overrides)
    est = estimate(cfg, 1, Precision.of(cfg)).total
    Path("/proc/self/clear_refs").write_text("5")
    base = process_bytes("VmRSS")
    trainer = Trainer(cfg)
    batches = iter(trainer.loader)
    for _ in range(2):
        trainer.step(next(batches))
    return {"estimate": est, "peak": process_bytes("VmHWM") - base}


@pytest.mark.slow
@pytest.mark.parametrize("config, overrides", [
    ("bench_r18_r50.yaml", ["data.image_size=64", "data.batch_size=16"]),  # R18 + R50, LARS, 4 views
    ("demo.yaml", ["data.backend=synthetic", "data.batch_size=48"]),  # shared views, AdamW, channels_last
    # a timm ViT peer beside a ResNet-50 (the view size and patch passed to timm)
    ("demo.yaml", ["data.backend=synthetic", "data.batch_size=48", "peers.r18.arch=timm:vit_tiny_patch16_224",
                   "peers.r18.cifar_stem=false", "peers.r18.arch_args={patch_size: 4}"]),
    # BYOL's target network and predictor, VICReg's 3-layer expander (its paper's 8192 wide)
    ("bench_r18_r50.yaml", ["data.image_size=64", "data.batch_size=16", "peers.r18.ssl=byol", "peers.r50.ssl=vicreg",
                            "peers.r18.head_hidden=null", "peers.r18.head_out=null", "peers.r50.head_hidden=null",
                            "peers.r50.head_out=null"]),
    # multi-crop: each group of views counted at its size (2 x 64 px + 4 x 32 px per peer)
    ("bench_r18_r50.yaml", ["data.image_size=64", "data.batch_size=16",
                            "views={global: {count: 2}, local: {count: 4, size: 32}}"]),
    # DINO's teacher with its prototypes and the scores over 65,536 of them for 2 + 6 crops
    ("cifar10_dino_r18_multicrop.yaml", ["data.backend=synthetic", "data.batch_size=32",
                                         "peers.r18.dino.prototypes=65536"]),
])
def test_estimate_is_within_25_percent_of_the_measured_peak_on_cpu(config, overrides):
    """Measured in a process of its own: a heap untouched by other tests."""
    r = in_a_process_of_its_own(_peak_of_two_steps, str(REPO / "configs" / config),
                                ["device=cpu", "data.synthetic.images=256", *overrides])
    assert 0.75 < r["estimate"] / r["peak"] < 1.25, r


def test_a_step_that_cannot_fit_is_refused_before_data_is_read(shapes, tmp_path, monkeypatch):
    cfg = config_mod.from_dict(tiny_config(shapes, tmp_path, data={"batch_size": 64, "image_size": 32}))
    model = memory.memory_model(cfg, 1, Precision(torch.float32, False))
    limit = model.at(24).total + 1  # room for 24 images, not 25 or 64
    monkeypatch.setattr(memory, "available_bytes", lambda device: limit)
    assert model.largest_batch(limit) == 24
    from dogo.engine.run.trainer import Trainer
    monkeypatch.setattr("dogo.engine.run.trainer.build_loader", lambda *a, **k: pytest.fail("data was read"))
    with pytest.raises(ConfigError, match=r"needs about .* GiB per rank .* lower data.batch_size to at most 24 "
                                          r"\(now 64"):
        Trainer(cfg)


@pytest.mark.slow
def test_make_imagenet_stops_within_seconds_with_the_estimate(shapes):
    """On this 2-core, 24 GiB machine the ImageNet DoGo config (512 images x 4 views at 224 px on one rank) cannot
    fit: make says so in one line, with the batch that would, before torchrun starts."""
    t0 = time.perf_counter()
    proc = subprocess.run(["make", "-s", "imagenet-r18-r50", f"IMAGENET={shapes}"], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.perf_counter() - t0 < 120
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lower data.batch_size to at most" in errors[0], out
    assert "torchrun" not in out and "ChildFailedError" not in out and "Traceback" not in out


def test_out_of_memory_mid_run_is_one_line_and_saves_nothing_new(shapes, tmp_path, monkeypatch):
    from dogo.core import checkpoint_files
    from dogo.engine.run.trainer import Trainer
    cfg = config_mod.from_dict(tiny_config(shapes, tmp_path, checkpoint={"every_steps": 2}))
    real = Trainer.step

    def step(self, views):
        if self.pos.step == 2:  # the third step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, views)

    monkeypatch.setattr(Trainer, "step", step)
    trainer = Trainer(cfg)
    with pytest.raises(ConfigError, match=r"out of CPU memory at step 3: .* lower data.batch_size \(now 8"):
        trainer.fit()
    assert [p.name for p in checkpoint_files.all_checkpoints(cfg.run_dir)] == ["step_000000002.pt"]


def test_workers_beyond_the_cores_are_clamped_with_a_line(monkeypatch):
    from dogo.engine.run.trainer import usable_workers
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert usable_workers(2) == (2, None)
    n, note = usable_workers(10)
    assert n == 2 and "data.workers=10 is more than the 2 core(s) each of the 2 rank(s)" in note

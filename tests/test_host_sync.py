"""The training step never makes the host wait for the device, and its op count does not grow with the batch.

On this CPU machine the step, the device recipe included (whose operations run on host-known subsets of the batch:
the same code on every device), runs under a guard that fails on every host synchronisation a GPU would suffer
(helpers.host_sync_guard). The log step, which reads the averaged terms once every log.every steps, is the one
allowed exception and is tested as such.
"""
import os

import pytest
import torch

from dogo.engine import config as config_mod
from dogo.models import Peer
from dogo.benchmarks.train_step import OpCounter
from tests.helpers import HostSyncError, host_sync_guard
from tests.helpers import gloo_ranks

HEAD = {"head_hidden": 32, "head_out": 16}
PEERS = {
    "simclr": {"s": {"arch": "resnet18", **HEAD, "tau": 0.5}},
    "mocov2": {"m": {"arch": "resnet18", **HEAD, "mocov2": {"queue_size": 64}}},
    "simsiam": {"p": {"arch": "resnet18", **HEAD, "simsiam": {"pred_hidden": 8}}},
    "dogo": {"a": {"arch": "resnet18", **HEAD, "tau": 0.5},
             "b": {"arch": "resnet18", **HEAD, "ssl": "mocov2", "mocov2": {"queue_size": 64}, "kl_weight": 0.5}},
    "disco": {"s": {"arch": "resnet18", **HEAD, "ssl": "simclr", "tau": 0.5}},
    "byol": {"y": {"arch": "resnet18", **HEAD, "byol": {"pred_hidden": 8}}},
    "vicreg": {"v": {"arch": "resnet18", **HEAD}},
    "barlowtwins": {"w": {"arch": "resnet18", **HEAD}},
    # DINO with its last layer training, and frozen (the default: epoch 0 holds every guarded step)
    "dino": {"d": {"arch": "resnet18", **HEAD, "dino": {"prototypes": 32, "freeze_last_layer_epochs": 0}}},
    "dino:frozen": {"d": {"arch": "resnet18", **HEAD, "dino": {"prototypes": 32}}},
    # DoGo pairs mixing methods (the objective is the name before the colon)
    "dogo:byol+simclr": {"y": {"arch": "resnet18", **HEAD, "ssl": "byol", "byol": {"pred_hidden": 8}},
                         "s": {"arch": "resnet18", **HEAD, "ssl": "simclr", "tau": 0.5}},
    "dogo:vicreg+barlowtwins": {"v": {"arch": "resnet18", **HEAD, "ssl": "vicreg"},
                                "w": {"arch": "resnet18", **HEAD, "ssl": "barlowtwins"}},
    "disco:byol": {"y": {"arch": "resnet18", **HEAD, "ssl": "byol", "byol": {"pred_hidden": 8}}},
}
# multi-crop: 2 x 16 px + 2 x 8 px views per image (objective:multicrop, the same peers as the objective alone)
MULTICROP = {"views": {"global": {"count": 2}, "local": {"count": 2, "size": 8}}}
for _name in ("simclr", "dogo", "disco", "dino"):
    PEERS[f"{_name}:multicrop"] = PEERS[_name]


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(5)
    t = Peer("resnet18", False, 32, 16)
    torch.save(t.backbone.state_dict(), d / "bb.pt")
    torch.save(t.head.state_dict(), d / "head.pt")
    return d


def _config(objective: str, tmp_path, teacher=None, batch=8, tile=4, **extra):
    raw = {"name": "t", "out_dir": str(tmp_path), "seed": 1, "device": "cpu",
           "data": {"backend": "synthetic", "synthetic": {"images": 64}, "image_size": 16, "batch_size": batch},
           "augment": {"blur_p": 0.5, "solarize_p": 0.2}, "peers": PEERS[objective],
           "objective": {"name": objective.split(":")[0], "tile": tile}, "optim": {"name": "lars", "lr": 0.1},
           "schedule": {"max_steps": 4, "warmup_epochs": 0}, "eval": {"knn_every_epochs": 0},
           "log": {"progress": "off", "tensorboard": "off"},
           **(MULTICROP if objective.endswith(":multicrop") else {}), **extra}
    if teacher is not None:
        raw["teacher"] = {"backbone": str(teacher / "bb.pt"), "head": str(teacher / "head.pt"), "arch": "resnet18"}
    return config_mod.from_dict(raw)


def _steps(trainer, n: int, guarded: bool):
    """n steps from the loader: the recipe on the device, then the training step, as the loop runs them."""
    batches = iter(trainer.loader)
    for _ in range(n):
        if guarded:
            with host_sync_guard():
                trainer.step(next(batches))
        else:
            trainer.step(next(batches))


@pytest.mark.parametrize("objective", list(PEERS))
def test_training_steps_have_no_host_sync(objective, tmp_path, teacher_files):
    from dogo.engine.run.trainer import Trainer
    trainer = Trainer(_config(objective, tmp_path, teacher_files if objective.startswith("disco") else None))
    _steps(trainer, 1, guarded=False)  # the first step creates the optimiser state and the cached constants
    _steps(trainer, 2, guarded=True)


def test_the_guard_catches_an_item_in_the_step_and_the_log_step(monkeypatch, tmp_path):
    """What the guard is for: an .item() added to the step fails it; the log step's one read is caught too (it is
    the allowed exception: the loop reads there every log.every steps, nowhere else)."""
    from dogo.engine.run import trainer as train_mod
    from dogo.engine.run.logger import MetricsLogger
    trainer = train_mod.Trainer(_config("simclr", tmp_path))
    _steps(trainer, 1, guarded=False)
    real = train_mod.objective_loss

    def with_item(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        if loss.item() > 1e9:  # the kind of line that slips into a training loop
            pass
        return loss, terms

    monkeypatch.setattr(train_mod, "objective_loss", with_item)
    with pytest.raises(HostSyncError, match="item"):
        _steps(trainer, 1, guarded=True)
    monkeypatch.setattr(train_mod, "objective_loss", real)
    log = MetricsLogger(tmp_path, True, 4, 0, 8, 1, progress="off")
    batch = next(iter(trainer.loader))
    with host_sync_guard():
        log.add(trainer.step(batch))  # accumulating the terms reads nothing
        with pytest.raises(HostSyncError, match="tolist"):
            log.flush(1, 0, trainer.lrs())


def _op_count(objective: str, tmp_path, batch: int, teacher) -> int:
    from dogo.engine.run.trainer import Trainer
    trainer = Trainer(_config(objective, tmp_path / str(batch), teacher, batch=batch, tile=64))
    _steps(trainer, 1, guarded=False)
    batches = iter(trainer.loader)
    with OpCounter() as counter:
        trainer.step(next(batches))
    return len(counter.ops)


@pytest.mark.parametrize("objective", ["dogo", "disco", "dogo:byol+simclr", "dogo:vicreg+barlowtwins",
                                       "simclr:multicrop", "dogo:multicrop", "disco:multicrop", "dino:multicrop"])
def test_op_count_of_a_step_does_not_grow_with_the_batch(objective, tmp_path, teacher_files):
    """No Python loop over images in the recipe or the step: 8 and 16 images dispatch the same ops (the kernel's
    tile of 64 holds both batches in one tile); with multi-crop the loops run over groups, crops and pairs."""
    teacher = teacher_files if objective.startswith("disco") else None
    assert _op_count(objective, tmp_path, 8, teacher) == _op_count(objective, tmp_path, 16, teacher)


def test_whole_dogo_r18_r50_step_within_its_op_budget(tmp_path):
    """The benchmark's DoGo step (ResNet-18 + ResNet-50, four views), the loader's batch and the device recipe
    included, under bf16 autocast as on a GPU (its weight casts counted): at most 2,300 aten ops (7,945 on the H200
    at commit 1388981, when the recipe launched per run of images)."""
    from dogo.engine.run.trainer import Trainer
    cfg = config_mod.load("configs/bench_r18_r50.yaml", [
        "device=cpu", "data.image_size=32", "data.batch_size=8", "data.synthetic.images=64", "name=ops",
        f"out_dir={tmp_path}", "precision.dtype=bf16", "log.tensorboard=off", "log.progress=off"])
    trainer = Trainer(cfg)
    _steps(trainer, 1, guarded=False)
    batches = iter(trainer.loader)
    with OpCounter() as counter:
        trainer.step(next(batches))
    assert len(counter.ops) <= 2300


@pytest.mark.parametrize("crops, kl_pairs", [(2, ((0, 1),)), (4, ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3)))])
def test_op_count_of_the_loss_kernel_grows_only_with_its_tiles(crops, kl_pairs):
    """Its loops run over tiles, crops, KL pairs and peers, never images."""
    from dogo.engine.ssl.contrastive import contrastive_terms

    def count(b: int, tile: int) -> int:
        zs = [[torch.nn.functional.normalize(torch.randn(b, 8), dim=1).requires_grad_() for _ in range(crops)]
              for _ in range(2)]
        with OpCounter() as c:
            terms = contrastive_terms(zs, [0.5, 0.5], 0.2, kl_pairs, tile)
            terms.sum().backward()
        return len(c.ops)

    assert count(8, 8) == count(32, 32)  # one tile either way
    assert count(16, 8) == count(32, 16)  # 2 x 2 tiles either way
    assert count(16, 8) > count(16, 16)


def _ranks_worker(rank: int, world: int, port: int, root: str, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from dogo.engine.run.trainer import Trainer
    try:
        from pathlib import Path
        trainer = Trainer(_config("dogo", Path(root), distributed={"sync_bn": True}))
        _steps(trainer, 1, guarded=False)
        _steps(trainer, 2, guarded=True)
        out[rank] = "ok"
    except Exception as exc:  # reported to the test, which fails with it
        import traceback
        out[rank] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_dogo_steps_under_two_gloo_ranks_with_sync_bn_have_no_host_sync(tmp_path):
    out = gloo_ranks(_ranks_worker, 2, str(tmp_path))
    assert out == {0: "ok", 1: "ok"}, "\n".join(map(str, out.values()))


def test_auto_tile_on_a_gpu_cuts_the_kernels_ops_at_16384_views_at_least_8x(monkeypatch):
    """objective.tile=auto with an H200's free memory (mem_get_info stood in for): 8,192 images (16,384 views) of a
    DoGo pair take one tile, not the 8 x 8 of the CPU tile, counted with the tile CUDA would use on fake CPU tensors
    (shapes only: the same aten ops dispatched, none of the 16,384^2 arithmetic; FakeTensorMode adds only its
    prim::device queries, left out of the count)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dogo.engine.config.resolve import CPU_TILE, auto_tile
    from dogo.engine.ssl.contrastive import contrastive_terms
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (139 * 2 ** 30, 141 * 2 ** 30))
    images = 8192
    gpu_tile = auto_tile(torch.device("cuda"), 2, images)
    assert auto_tile(torch.device("cpu"), 2, images) == CPU_TILE

    def ops(tile: int) -> int:
        with FakeTensorMode():
            zs = [[torch.nn.functional.normalize(torch.randn(images, 8), dim=1).requires_grad_() for _ in range(2)]
                  for _ in range(2)]
            with OpCounter() as c:
                contrastive_terms(zs, [0.5, 0.5], 0.2, tile=tile).sum().backward()
        return sum(not op.startswith("prim::") for op in c.ops)

    assert gpu_tile >= 4096 and 8 * ops(gpu_tile) <= ops(CPU_TILE)

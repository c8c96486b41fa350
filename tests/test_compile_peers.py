"""precision.compile=peers: each peer's forward compiled by torch.compile (C++ kernels here, Triton on CUDA) trains
as eager does, to float rounding, and its checkpoints keep the eager keys."""
import pytest
import torch

from dogo.engine import config as config_mod


def _trained(tmp_path, compile_mode: str):
    from dogo.engine.run.trainer import Trainer
    cfg = config_mod.from_dict({
        "name": f"c_{compile_mode}", "out_dir": str(tmp_path), "seed": 3, "device": "cpu",
        "data": {"backend": "synthetic", "synthetic": {"images": 16}, "image_size": 16, "batch_size": 4, "workers": 0},
        "peers": {"a": {"arch": "resnet18", "head_hidden": 32, "head_out": 16, "cifar_stem": True}},
        "objective": {"name": "simclr"}, "optim": {"name": "sgd", "lr": 0.1},
        "schedule": {"max_steps": 2, "warmup_epochs": 0}, "eval": {"knn_every_epochs": 0},
        "precision": {"compile": compile_mode}, "log": {"progress": "off", "tensorboard": "off"}})
    trainer = Trainer(cfg)
    batches = iter(trainer.loader)
    for _ in range(2):
        trainer.step(next(batches))
    return trainer


@pytest.mark.slow
def test_compiled_peers_take_the_eager_steps(tmp_path):
    eager, compiled = _trained(tmp_path, "off"), _trained(tmp_path, "peers")
    want, got = eager.state_dict()["peers"]["a"], compiled.state_dict()["peers"]["a"]
    assert list(got) == list(want)  # no _orig_mod. prefix: checkpoints and exports are the eager ones
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-4, msg=key)

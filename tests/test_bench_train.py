"""`dogo bench train`: images/s with FLOPs per image, TFLOP/s, MFU and ops per step in its JSON."""
import json

import pytest

from dogo.benchmarks.train_step import count_flops, peak_tflops
from dogo.engine import config as config_mod
from tests.helpers import REPO, run_cli


@pytest.mark.slow
def test_bench_train_writes_flops_mfu_and_ops(tmp_path):
    out = tmp_path / "train.json"
    run_cli("bench", "train", "configs/bench_r18_r50.yaml", "data.image_size=32", "data.batch_size=4",
            "data.synthetic.images=16", "device=cpu", "--warmup", "1", "--steps", "1", "--repeats", "1",
            "--peak-tflops", "2.0", "--json", str(out))
    r = json.loads(out.read_text())
    assert r["flops_per_image"] > 1e9 and r["ops_per_step"] > 1000
    assert r["tflops"] == pytest.approx(r["flops_per_image"] * r["step_with_batch_and_augmentation"]
                                        ["images_per_s_median"] / 1e12)
    assert r["peak_tflops"] == 2.0 and r["mfu"] == pytest.approx(r["tflops"] / 2.0)
    assert r["sync_warnings"] is None  # CUDA's sync debug mode only; the CPU's check is test_host_sync.py
    m = r["memory"]
    assert m["estimate_bytes"] == sum(m["estimate_parts"].values()) and m["measured_peak_bytes"] > 0


def test_peak_table_knows_the_common_gpus():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0 and peak_tflops(None) is None
    assert peak_tflops("NVIDIA L40S") == 362.0 and peak_tflops("NVIDIA L4") == 121.0


@pytest.mark.slow  # a full-size step: 224 px through a ResNet-50
def test_flops_per_image_of_the_imagenet_dogo_step():
    """R18 + R50 at 224 px, two views each, forward and backward: ~3 x 2 x (1.82 + 4.09) GMAC x 2 FLOP/MAC = 70.9
    GFLOP by the models' published multiply-accumulates; torch's counter gives 69.97 (it skips BN and pooling)."""
    from dogo.engine.run.trainer import Trainer
    cfg = config_mod.load(REPO / "configs" / "bench_r18_r50.yaml",
                          ["device=cpu", "data.batch_size=2", "data.synthetic.images=2"])
    trainer = Trainer(cfg)
    batch = next(iter(trainer.loader))
    per_image = count_flops(lambda: trainer.step(batch)) / 2
    assert per_image == pytest.approx(69.97e9, rel=0.01)


@pytest.mark.slow  # three trainers' steps, FLOPs and the plain ceiling
def test_a_multi_crop_step_is_reported_beside_its_two_view_self(tmp_path):
    """`dogo bench train` of a multi-crop config measures the same config with its first group's two views beside
    it: images/s and ops per step of each (more crops: more ops, a few per crop and group, not per image)."""
    from dogo.benchmarks.train_step import bench_train, summary
    cfg = config_mod.load(None, [
        "device=cpu", f"out_dir={tmp_path}", "name=mc", "data.backend=synthetic", "data.synthetic.images=8",
        "data.image_size=16", "data.batch_size=4", "objective.name=simclr", "objective.tile=64",
        "peers={r18: {arch: resnet18, head_hidden: 16, head_out: 8}}", "log.tensorboard=off",
        "eval.knn_every_epochs=0", "views={global: {count: 2}, local: {count: 2, size: 8}}"])
    r = bench_train(cfg, warmup=1, steps=1, repeats=1)
    two = r["two_view"]
    assert list(two["views"]) == ["global"] and two["views"]["global"]["count"] == 2
    assert 0 < two["ops_per_step"] < r["ops_per_step"]
    assert two["step_with_batch_and_augmentation"]["images_per_s_median"] > 0
    assert "its two-view step" in summary(r, "mc")

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


def test_bench_train_with_cuda_graphs_counts_launches_and_compares_with_eager(tmp_path):
    """precision.cuda_graphs=on (set past the check that asks for CUDA: on this CPU the graph trainer's step runs
    uncaptured, so no replay is counted): launches per step with the ops of the captured region, and the same step
    eager in the same process, with the graphs run's speed-ups over it."""
    from dogo.benchmarks.train_step import bench_train, summary
    cfg = config_mod.load(REPO / "configs" / "cifar10_simclr_r18.yaml", [
        "data.backend=synthetic", "data.image_size=16", "data.batch_size=4", "data.synthetic.images=16",
        "device=cpu", f"out_dir={tmp_path}", "eval.knn_every_epochs=0", "log.tensorboard=off"])
    cfg.precision.cuda_graphs = "on"
    r = bench_train(cfg, warmup=1, steps=1, repeats=1)
    graphs, eager = r["launches_per_step"], r["eager"]["launches_per_step"]
    assert r["warmup_steps"] == 4 and graphs["graph_eager_steps"] >= 6 and graphs["graph_replays"] == 0
    # uncaptured, the step dispatches the region a replay runs plus the recipe, the host-side settings and the
    # copies into the graph's buffers; the eager step (foreach AdamW on a CPU: more ops than the fused one) more
    assert 0.5 * graphs["aten_ops"] < graphs["ops_per_replay"] < graphs["aten_ops"] < eager["aten_ops"]
    assert graphs["host_launches"] == graphs["aten_ops"] and eager["graph_replays"] == 0
    assert r["flops_per_image"] > 0 and r["eager"]["graphs_speedup_engine_only"] > 0
    line = summary(r, cfg.name)
    assert f"CUDA graph replay of {graphs['ops_per_replay']} ops" in line and "eager (cuda_graphs=off)" in line


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

"""CUDA graphs for the training step (precision.cuda_graphs, engine/run/graphs.py).

On this CPU machine nothing can be captured, so these tests hold what makes the step capturable, on the graph
trainer's own code with the device as a parameter: its step (views copied into static buffers, the lr and the
momenta in device tensors, fused optimisers) run uncaptured equals the eager step bit for bit over steps whose lr
changes, and across a checkpoint and resume in both directions; the region a graph captures makes no host
synchronisation and dispatches the same kernels with the same arguments on the same memory at every step
(helpers.KernelRecord), which is what a replay does. The last test captures and replays on a GPU and skips
without one.
"""
import copy
import gc

import pytest
import torch

from dogo.core.errors import ConfigError
from dogo.engine import config as config_mod
from dogo.engine.run.optim import build_optimizer
from dogo.pipelines.base import endless
from tests.helpers import KernelRecord, host_sync_guard, tiny_config

HEAD = {"head_hidden": 32, "head_out": 16}
CASES = {
    # the CIFAR configs' optimiser with a warm-up: the lr changes at every step
    "simclr-adamw": {"peers": {"s": {"arch": "resnet18", **HEAD, "tau": 0.5}}, "objective": {"name": "simclr"},
                     "optim": {"name": "adamw", "lr": 1e-3}},
    # LARS with clipping, a MoCo peer (queue and key encoder) beside a SimCLR one, DoGo's KL through the kernel
    "dogo-lars-moco": {"peers": {"a": {"arch": "resnet18", **HEAD, "tau": 0.5},
                                 "b": {"arch": "resnet18", **HEAD, "ssl": "mocov2", "mocov2": {"queue_size": 64},
                                       "kl_weight": 0.5}},
                       "objective": {"name": "dogo", "tile": 4}, "optim": {"name": "lars", "lr": 0.5,
                                                                           "clip_grad_norm": 1.0}},
    # BYOL's target network, whose momentum follows a cosine and so changes at every step; fused SGD
    "byol-sgd": {"peers": {"y": {"arch": "resnet18", **HEAD, "byol": {"pred_hidden": 8}}},
                 "objective": {"name": "byol"}, "optim": {"name": "sgd", "lr": 0.1}},
}

# the other methods' losses, for the kernel record only (no state of their own between steps)
RECORDED = {**CASES,
            "vicreg-barlowtwins": {"peers": {"v": {"arch": "resnet18", **HEAD, "ssl": "vicreg"},
                                             "w": {"arch": "resnet18", **HEAD, "ssl": "barlowtwins"}},
                                   "objective": {"name": "dogo"}, "optim": {"name": "sgd", "lr": 0.1}},
            "simsiam": {"peers": {"p": {"arch": "resnet18", **HEAD, "simsiam": {"pred_hidden": 8}}},
                        "objective": {"name": "simsiam"}, "optim": {"name": "lars", "lr": 0.1}}}


def _raw(case: str, out_dir, device: str = "cpu", **extra) -> dict:
    raw = {"name": "g", "out_dir": str(out_dir), "seed": 2, "device": device,
           "data": {"backend": "synthetic", "synthetic": {"images": 64}, "image_size": 16, "batch_size": 8},
           "augment": {"blur_p": 0.5, "solarize_p": 0.2}, "schedule": {"max_steps": 8, "warmup_epochs": 0.5},
           "eval": {"knn_every_epochs": 0}, "log": {"progress": "off", "tensorboard": "off"},
           "checkpoint": {"resume": "none"}, **copy.deepcopy(RECORDED[case])}
    for key, value in extra.items():
        raw.setdefault(key, {}).update(value)
    return raw


def _trainer(raw: dict, graphs: bool, resume: str | None = None):
    """The trainer of `raw` with precision.cuda_graphs on or off. On a CPU `on` is set past the check that asks for
    CUDA: the graph trainer's code runs, uncaptured. The eager trainer takes the optimiser of the eager CUDA step
    (fused kernels, a Python float lr), which the graph trainer's fused kernels with a device lr must equal."""
    from dogo.engine.run.trainer import Trainer
    cfg = config_mod.from_dict(raw)
    if graphs:
        cfg.precision.cuda_graphs = "on"
    if resume:
        cfg.checkpoint.resume = resume
    trainer = Trainer(cfg)
    if not graphs and cfg.optim.name != "lars" and trainer.ctx.device.type == "cpu":
        trainer.optimizer = build_optimizer(dict(trainer.model.peers.items()), cfg, cfg.data.batch_size,
                                            torch.device("cuda"))
    if resume:
        trainer.resume()
    return trainer


def _run(trainer, batches) -> list[dict]:
    """Steps as the training loop takes them (the position advanced after each: the lr and momenta change)."""
    terms = []
    for batch in batches:
        terms.append({k: v.clone() for k, v in trainer.step(batch).items()})
        trainer.pos.step += 1
    return terms


def _state(trainer) -> dict[str, torch.Tensor]:
    """Every tensor the run carries: peers, optimiser state, method states, online probe, divergence flag."""
    out = {f"peer.{k}": v for k, v in trainer.model.state_dict().items()}
    out.update({f"targets.{k}": v for k, v in trainer.targets.state_dict().items() if isinstance(v, torch.Tensor)})
    for i, state in trainer.optimizer.state_dict()["state"].items():
        out.update({f"optimizer.{i}.{k}": v for k, v in state.items()})
    if trainer.probe:
        out.update({f"probe.{k}": v for k, v in trainer.probe.classifiers.state_dict().items()})
    if trainer.watch.nonfinite is not None:  # made by the first step
        out["nonfinite"] = trainer.watch.nonfinite
    return out


def _assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key].float(), b[key].float()), f"{what}: {key} differs"


def _equal_runs(raw_for, tmp_path, first: int, then: int):
    """Eager and graph trainers `first` steps from the start, then each resumed from the other's checkpoint for
    `then` more, on the same batches (the eager trainer's loader's)."""
    eager, graphs = _trainer(raw_for(tmp_path / "eager"), False), _trainer(raw_for(tmp_path / "graphs"), True)
    loader = iter(eager.loader)
    batches = [next(loader) for _ in range(first + then)]
    _assert_equal(_state(eager), _state(graphs), "at the start")
    for k, (te, tg) in enumerate(zip(_run(eager, batches[:first]), _run(graphs, batches[:first]))):
        _assert_equal(te, tg, f"terms of step {k + 1}")
    _assert_equal(_state(eager), _state(graphs), f"after {first} steps")
    assert graphs.graph.eager_steps == first and graphs.graph.replays == 0  # a CPU captures nothing
    from_eager, from_graphs = str(eager.save()), str(graphs.save())
    lrs = eager.lrs()
    assert lrs == graphs.lrs() and all(isinstance(v, float) for v in lrs.values())
    # each resumes from the other's checkpoint: the two write the same state and read each other's
    eager = _trainer(raw_for(tmp_path / "eager2"), False, resume=from_graphs)
    graphs = _trainer(raw_for(tmp_path / "graphs2"), True, resume=from_eager)
    assert eager.pos.step == graphs.pos.step == first
    rest = batches[first:]
    for k, (te, tg) in enumerate(zip(_run(eager, rest), _run(graphs, rest))):
        _assert_equal(te, tg, f"terms of step {first + k + 1}, resumed")
    _assert_equal(_state(eager), _state(graphs), f"after {first} + {len(rest)} steps, resumed")
    return eager, graphs


@pytest.mark.parametrize("case", list(CASES))
def test_the_graph_step_equals_the_eager_step_bit_for_bit_across_a_resume(case, tmp_path):
    eager, graphs = _equal_runs(lambda out: _raw(case, out), tmp_path, first=3, then=2)
    if case == "byol-sgd":  # the momentum followed its cosine up from BYOL's 0.996 (the value it was built with)
        assert graphs.targets.states["y"].target.momentum > 0.998


def test_the_graph_step_with_the_online_probe_equals_the_eager_step(shapes, tmp_path):
    """The folder backend's labelled batches through the probe's own optimiser, beside DoGo with LARS."""
    raw_for = lambda out: tiny_config(shapes, out, eval={"knn_every_epochs": 0, "online_probe": "on"},  # noqa: E731
                                      checkpoint={"resume": "none"})
    eager, graphs = _equal_runs(raw_for, tmp_path, first=3, then=2)
    assert "probe/a/top1" in graphs.step(next(iter(graphs.loader)))


def _region_records(trainer, batches) -> list[list]:
    """The records of the region a graph captures (the trainer's device step), one per batch, the whole step
    (its host-side settings, the copies into the static buffers, the terms handed out) under the host-sync guard."""
    body, records = trainer.graph.body, []

    def recorded(views, labels):
        with KernelRecord() as record:
            out = body(views, labels)
        records.append(record.ops)
        return out

    trainer.graph.body = recorded
    for batch in batches:
        # The record hands every op's tensors to Python; when the collector frees those wrappers differs from step
        # to step, and autograd then steals a gradient or copies it (new_empty_strided): seen once in a fresh
        # clone's suite. Collected before each step and paused during it, every step's record is the same.
        gc.collect()
        gc.disable()
        try:
            with host_sync_guard():
                trainer.step(batch)
        finally:
            gc.enable()
        trainer.pos.step += 1
    trainer.graph.body = body
    return records


def _first_difference(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"op {i}: {x}\n  then: {y}"
    return f"{len(a)} ops, then {len(b)}"


@pytest.mark.parametrize("case", [*RECORDED, "probe"])
def test_the_captured_region_replays_the_same_kernels_at_every_step_without_host_sync(case, shapes, tmp_path):
    if case == "probe":
        raw = tiny_config(shapes, tmp_path, eval={"knn_every_epochs": 0, "online_probe": "on"})
    else:
        raw = _raw(case, tmp_path)
    trainer = _trainer(raw, True)
    batches = iter(trainer.loader)
    _run(trainer, [next(batches)])  # the first step makes the optimiser's state, as the graph's warm-up does
    first, second = _region_records(trainer, [next(batches), next(batches)])
    assert len(first) > 300 and first == second, _first_difference(first, second)


def test_the_record_tells_what_a_replay_would_get_wrong(tmp_path, monkeypatch):
    """What the comparison above catches: a Python float lr (a fused optimiser as the eager step builds it) reaches
    the optimiser's kernel as a number that changes with the schedule; a divergence flag rebound at every step
    (flag = flag | bad) lives in new memory at every step, so a replay would keep reading the one of the capture."""
    from dogo.engine.run.guards import DivergenceWatch
    trainer = _trainer(_raw("simclr-adamw", tmp_path), True)
    batches = iter(trainer.loader)
    trainer.optimizer = build_optimizer(dict(trainer.model.peers.items()), trainer.cfg, 8, torch.device("cuda"))
    _run(trainer, [next(batches)])
    first, second = _region_records(trainer, [next(batches), next(batches)])
    assert first != second and "_fused_adamw_" in _first_difference(first, second)

    trainer = _trainer(_raw("simclr-adamw", tmp_path / "flag"), True)
    batches = iter(trainer.loader)
    _run(trainer, [next(batches)])

    def rebinding(self, loss):
        bad = ~torch.isfinite(loss)
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
    monkeypatch.setattr(DivergenceWatch, "note", rebinding)
    first, second = _region_records(trainer, [next(batches), next(batches)])
    assert first != second and "bitwise_or" in _first_difference(first, second)


def test_cuda_graphs_need_cuda_one_process_and_no_compiled_peers(tmp_path):
    raw = _raw("simclr-adamw", tmp_path)
    with pytest.raises(ConfigError, match="precision.cuda_graphs=on needs CUDA"):
        config_mod.from_dict(raw, ["precision.cuda_graphs=on"])
    cfg = config_mod.from_dict(raw)
    assert cfg.precision.cuda_graphs == "off"  # auto: off until a GPU run shows the graphs faster
    cfg.device, cfg.precision.cuda_graphs, cfg.precision.compile = "cuda", "on", "peers"
    with pytest.raises(ConfigError, match="choose one"):
        config_mod.check(cfg)


def _two_ranks_refuse(rank: int, world: int, port: int, root: str, out):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from dogo.engine.run.trainer import Trainer
    cfg = config_mod.from_dict(_raw("simclr-adamw", root))
    cfg.precision.cuda_graphs = "on"
    try:
        Trainer(cfg)
        out[rank] = "built"
    except ConfigError as exc:
        out[rank] = str(exc)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_cuda_graphs_under_torchrun_are_refused_in_one_line(tmp_path):
    from tests.helpers import gloo_ranks
    out = gloo_ranks(_two_ranks_refuse, 2, str(tmp_path))
    assert all("one process only" in v and "2 ranks" in v for v in out.values()), out


GPU_CASES = {"simclr-adamw": "bf16", "dogo-lars-moco": "fp16", "byol-sgd": "fp32", "dogo-probe": "bf16"}


def _gpu_raw(case: str, out, shapes) -> dict:
    """A GPU case's config: a warm-up over the whole run, so that the lr changes at every replayed step."""
    if case == "dogo-probe":  # the folder backend's labelled batches (10 an epoch) through the online probe
        return tiny_config(shapes, out, device="cuda", precision={"dtype": GPU_CASES[case]},
                           eval={"knn_every_epochs": 0, "online_probe": "on"}, checkpoint={"resume": "none"},
                           schedule={"max_steps": 12, "warmup_epochs": 1.2})
    return _raw(case, out, device="cuda", precision={"dtype": GPU_CASES[case]},
                schedule={"max_steps": 12, "warmup_epochs": 1.5})


def _parts(trainer) -> dict[str, torch.Tensor]:
    """Every parameter the step moves, as one float64 vector per part: the peers, the method states' momentum
    encoders, the online probe's classifiers."""
    modules = {"peers": trainer.model, "momentum encoders": trainer.targets}
    if trainer.probe:
        modules["online probe"] = trainer.probe.classifiers
    return {name: torch.cat([p.detach().flatten().double() for p in m.parameters()] or [torch.zeros(0)])
            for name, m in modules.items()}


def _same_updates(eager, graphs, steps, replays: bool = False) -> None:
    """Both trainers take `steps`; what they move each part by agrees to 2% (a graph that kept its capture step's
    lr, or BYOL momentum, would be 27-35% off here: measured on the CPU by freezing them).
    replays: the graph's steps are all replays, which must make no host synchronisation (the capture itself does)."""
    before = [_parts(t) for t in (eager, graphs)]
    _run(eager, steps)
    torch.cuda.set_sync_debug_mode("error" if replays else "default")
    try:
        _run(graphs, steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    after = [_parts(t) for t in (eager, graphs)]
    for part in after[0]:
        moved_e, moved_g = after[0][part] - before[0][part], after[1][part] - before[1][part]
        assert (moved_g - moved_e).norm() <= 0.02 * moved_e.norm(), part


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_captured_and_replayed_steps_follow_the_eager_steps_on_a_gpu(case, shapes, tmp_path, monkeypatch):
    """3 eager steps and the capture, then 3 replays whose lr (a warm-up over the whole run) and BYOL momentum change
    at every step, fp16 with GradScaler inside the graph: the replays move the weights as the eager trainer's steps
    do, without host synchronisation; a checkpoint of it resumes into a new graph (3 eager steps, the capture, a
    replay) that goes on as the eager trainer does."""
    eager = _trainer(_gpu_raw(case, tmp_path / "eager", shapes), False)
    graphs = _trainer(_gpu_raw(case, tmp_path / "graphs", shapes), True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # the same convolution algorithms in both
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    loader = endless(eager.loader)  # 8 or 10 batches an epoch
    batches = [next(loader) for _ in range(12)]
    _same_updates(eager, graphs, batches[:4])  # the fourth captured (and replayed once)
    _same_updates(eager, graphs, batches[4:7], replays=True)
    assert graphs.graph.eager_steps == 3 and graphs.graph.replays == 4
    graphs.watch.require_finite(graphs.pos.step)
    resumed = _trainer(_gpu_raw(case, tmp_path / "graphs2", shapes), True, resume=str(graphs.save()))
    assert resumed.pos.step == 7
    _same_updates(eager, resumed, batches[7:12])
    assert resumed.graph.eager_steps == 3 and resumed.graph.replays == 2

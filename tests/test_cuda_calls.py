"""Every CUDA-only branch, checked on this CPU machine so that a renamed argument fails here and not on a user's GPU:
the same function run with the device as a parameter where the library allows it, else the call checked against
the installed library's signature or schema. docs/gpu.md lists each branch with its test here. (The
DALI mixed decoder's graph is defined for every recipe option in test_dali.py.)
"""
import inspect

import pytest
import torch
import torch.nn as nn


def test_contrastive_dot_on_cuda_uses_mm_with_an_fp32_output():
    """engine/ssl/contrastive.py _dot: torch.mm(bf16, bf16, out_dtype=float32) on CUDA (tensor cores, fp32 out)."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aten::mm.dtype", "CUDA")
    a = torch.empty(8, 16, dtype=torch.bfloat16, device="meta")
    b = torch.empty(16, 4, dtype=torch.bfloat16, device="meta")
    out = torch.mm(a, b, out_dtype=torch.float32)  # the meta kernel checks the same schema as the CUDA one
    assert out.shape == (8, 4) and out.dtype == torch.float32


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimisers_take_the_same_steps_as_foreach(name):
    """engine/run/optim.py build_optimizer: fused=True on CUDA; torch's fused kernels also run on CPUs, so the same
    flags are run here against the foreach ones."""
    from dogo.engine.config import Config
    from dogo.engine.run.optim import build_optimizer
    cfg = Config()
    cfg.optim.name = name
    torch.manual_seed(0)
    peers = {"r18": nn.Linear(5, 3)}
    twin = {"r18": nn.Linear(5, 3)}
    twin["r18"].load_state_dict(peers["r18"].state_dict())
    fused = build_optimizer(peers, cfg, 256, torch.device("cuda"))  # the CUDA branch's flags
    plain = build_optimizer(twin, cfg, 256, torch.device("cpu"))
    assert all(g.get("fused") for g in fused.param_groups) or fused.defaults.get("fused")
    for _ in range(3):
        x = torch.randn(4, 5)
        for opt, model in ((fused, peers), (plain, twin)):
            opt.zero_grad()
            model["r18"](x).square().sum().backward()
            opt.step()
    for a, b in zip(peers["r18"].parameters(), twin["r18"].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nccl_init_and_ddp_arguments_exist():
    """engine/dist/distributed.py init: init_process_group(device_id=); engine/run/trainer.py: DDP(device_ids=[index]) with
    ddp_options (the same options run under gloo in test_runs.py and test_host_sync.py)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dogo.engine.run.trainer import ddp_options
    assert "device_id" in inspect.signature(dist.init_process_group).parameters
    ddp = inspect.signature(DistributedDataParallel).parameters
    assert "device_ids" in ddp and set(ddp_options(nn.BatchNorm1d(2), sync_bn=True)) <= set(ddp)
    assert dist.is_nccl_available() or not torch.cuda.is_available()


def test_ddp_options_on_a_torch_without_forward_sync_buffers(monkeypatch):
    """torch 2.11 (a GPU machine's own torch) has no forward_sync_buffers: the same switch goes by its old name,
    and nothing the installed DDP lacks is passed."""
    from dogo.engine.run import trainer as train

    class OldDDP:  # DistributedDataParallel.__init__'s keywords in torch 2.11
        def __init__(self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True,
                     process_group=None, bucket_cap_mb=None, find_unused_parameters=False, check_reduction=False,
                     gradient_as_bucket_view=False, static_graph=False):
            pass

    monkeypatch.setattr(train, "DistributedDataParallel", OldDDP)
    assert train.ddp_options(nn.BatchNorm1d(2), sync_bn=False) == {"gradient_as_bucket_view": True,
                                                                  "broadcast_buffers": True}
    assert train.ddp_options(nn.BatchNorm1d(2), sync_bn=True)["broadcast_buffers"] is False
    assert set(train.ddp_options(nn.Linear(2, 2), sync_bn=False)) <= set(inspect.signature(OldDDP).parameters)


def test_cuda_runtime_calls_exist():
    """engine/run/trainer.py (set_device, cudnn.benchmark, TF32, RNG state in checkpoints), benchmarks (synchronize,
    memory statistics, device name), docs/gpu.md's sync debug mode."""
    for name in ("set_device", "synchronize", "mem_get_info", "max_memory_allocated", "reset_peak_memory_stats",
                 "memory_allocated", "get_device_name", "get_rng_state_all", "set_rng_state_all",
                 "set_sync_debug_mode"):
        assert callable(getattr(torch.cuda, name)), name
    assert hasattr(torch.backends.cudnn, "benchmark")
    torch.set_float32_matmul_precision("high")  # the call the trainer makes on CUDA; harmless here
    torch.set_float32_matmul_precision("highest")


def test_grad_scaler_and_autocast_on_cuda_take_our_arguments():
    """engine/run/trainer.py: torch.amp.GradScaler(device_type, enabled=) and torch.autocast('cuda', dtype=bf16/fp16)."""
    params = inspect.signature(torch.amp.GradScaler.__init__).parameters
    assert "enabled" in params and "device" in params
    assert "dtype" in inspect.signature(torch.autocast.__init__).parameters
    # the fp16 path under LARS: test_optim.py runs GradScaler with LARS's device-side inf handling on the CPU


def test_generators_and_pinned_copies_take_a_device():
    """pipelines/backends/synthetic.py: torch.Generator(device=...); pipelines/recipe/device.py to_device (the recipe's parameters:
    Tensor.pin_memory, then .to(device, non_blocking=True)); the loaders: DataLoader(pin_memory=), the FFCV
    backend's host buffer torch.empty(pin_memory=) copied with .to(non_blocking=True)."""
    import numpy as np

    from dogo.pipelines.recipe.device import to_device
    assert torch.Generator(device=torch.device("cpu")).device.type == "cpu"  # the keyword synthetic passes
    assert "pin_memory" in inspect.signature(torch.utils.data.DataLoader.__init__).parameters
    assert callable(torch.Tensor.pin_memory) and "non_blocking" in torch.Tensor.to.__doc__
    assert torch.empty(2, pin_memory=False).shape == (2,)  # the keyword exists (pinning itself needs CUDA)
    x = torch.arange(4)
    assert torch.equal(x.to("cpu", non_blocking=True), x)
    assert torch.equal(to_device(np.arange(4), torch.device("cpu")), x)


def test_dali_mixed_decoder_takes_the_hardware_load():
    """pipelines/backends/dali_loader.py: fn.decoders.image(device='mixed', hw_decoder_load=): the argument is in the
    operator's schema (test_dali.py also defines the whole GPU graph)."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import backend
    assert backend.GetSchema("decoders__Image").HasArgument("hw_decoder_load")


def test_cuda_graph_calls_take_our_arguments():
    """engine/run/graphs.py StepGraph: torch.cuda.CUDAGraph().replay(), torch.cuda.graph(graph, capture_error_mode=
    "thread_local") around the capture,
    warm-up on torch.cuda.Stream(device) with wait_stream both ways under torch.cuda.stream(side), and
    torch.cuda.current_stream(device); engine/run/optim.py: AdamW(fused=True, capturable=True) with a tensor lr
    (the same constructor runs on the CPU in tests/test_graphs.py)."""
    assert callable(torch.cuda.CUDAGraph) and callable(torch.cuda.CUDAGraph.replay)
    graph = inspect.signature(torch.cuda.graph.__init__).parameters
    assert list(graph)[1] == "cuda_graph" and graph["capture_error_mode"].default == "global"
    assert "device" in inspect.signature(torch.cuda.Stream.__new__).parameters
    assert list(inspect.signature(torch.cuda.Stream.wait_stream).parameters) == ["self", "stream"]
    assert "device" in inspect.signature(torch.cuda.current_stream).parameters
    assert list(inspect.signature(torch.cuda.stream).parameters) == ["stream"]
    adamw = inspect.signature(torch.optim.AdamW.__init__).parameters
    assert {"fused", "capturable", "lr"} <= set(adamw)


def _has_cuda_kernel(op: str) -> bool:
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return any(has(op, key) for key in ("CUDA", "CompositeImplicitAutograd", "CompositeExplicitAutograd",
                                         "CompositeExplicitAutogradNonFunctional"))


def test_every_op_of_the_captured_step_has_a_cuda_kernel(tmp_path):
    """The region a CUDA graph captures, run on the CPU by the graph trainer (tests/test_graphs.py): every aten op
    it dispatches (the fused optimisers with a tensor lr, the foreach ops with a tensor momentum, the queue's
    in-place position, ...) has a CUDA kernel (or a composite one that decomposes into ops that do) in the
    installed torch."""
    from tests.helpers import KernelRecord
    from tests.test_graphs import CASES, _raw, _trainer
    ops = set()
    for case in CASES:
        trainer = _trainer(_raw(case, tmp_path / case), True)
        batches = iter(trainer.loader)
        trainer.step(next(batches))
        body = trainer.graph.body

        def recorded(views, labels):
            with KernelRecord() as record:
                out = body(views, labels)
            for op in record.ops:  # aten.split.Tensor -> aten::split.Tensor; aten.mm.default -> aten::mm
                namespace, name, overload = op[0].split(".")
                ops.add(f"{namespace}::{name}" + ("" if overload == "default" else f".{overload}"))
            return out
        trainer.graph.body = recorded
        trainer.step(next(batches))
    missing = sorted(op for op in ops if op.startswith("aten::") and not _has_cuda_kernel(op))
    assert len(ops) > 50 and not missing, missing

"""What the tests share: the tiny config, running the CLI in a process or in this one, free ports, and the guard
that fails on host synchronisation. Imported by the tests (conftest.py holds only pytest's hooks and fixtures)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fork_server():
    """multiprocessing's fork server for this pytest process: one interpreter that imports torch and the engine
    once, from which each process the tests ask for is forked in a fraction of a second instead of importing them
    again (seconds each). Not forked from this process itself: after a backward pass here, torch refuses autograd
    in a fork, and a fork after a multi-threaded OpenMP region hangs."""
    import torch.multiprocessing as mp
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "dogo.engine.run.trainer", "tests.helpers"])
    return context


def gloo_ranks(worker, world: int, *args) -> dict:
    """worker(rank, world, port, *args, out) in `world` real processes that form a gloo group (forked from the fork
    server); returns what each rank put in out[rank]."""
    import torch.multiprocessing as mp
    fork_server()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(worker, args=(world, free_port(), *args, out), nprocs=world, start_method="forkserver")
        return dict(out)


def in_a_process_of_its_own(fn, *args):
    """fn(*args) in a process forked from the fork server, with a heap of its own (for a memory peak): its value,
    or its exception raised here."""
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=fork_server()) as pool:
        return pool.submit(fn, *args).result()


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


def dogo(*args) -> int:
    """Run `dogo ...` in this process (its exit status): no interpreter start-up, for commands whose process
    boundary is not what the test is about. On one intra-op thread, as run_cli's processes (cli_env), so that
    the two give bit-identical runs."""
    import torch

    from dogo.cli import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


class HostSyncError(AssertionError):
    """Something in the guarded code would make the host wait for a GPU."""


def host_sync_guard():
    """A context that fails on what would synchronise a GPU with the host, on any device (the tests run on the
    CPU): reading a value (.item(), bool/float/int of a tensor, .tolist(), .numpy(), .cpu()), data-dependent shapes
    (nonzero, boolean-mask indexing, masked_select), and constants made from host data (torch.tensor, as_tensor,
    new_tensor), which on a GPU are blocking host-to-device copies. Host arrays (the recipe's parameters, drawn on
    the host) reach the device through pipelines.augment.to_device only: from pinned memory, asynchronously
    (tests/test_cuda_calls.py checks that branch's calls)."""
    import contextlib

    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "nonzero",
             "tensor", "as_tensor", "new_tensor", "masked_select"}
    aten = {"_local_scalar_dense", "nonzero", "masked_select", "lift_fresh", "lift_fresh_copy"}
    host_array = [0]  # inside augment.to_device: host memory, then an asynchronous copy from pinned memory

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in reads:
                raise HostSyncError(f"host synchronisation: {name}")
            return func(*args, **(kwargs or {}))

    from dogo.pipelines.recipe import device as augment
    real_to_device = augment.to_device

    def to_device(array, device):
        host_array[0] += 1
        try:
            return real_to_device(array, device)
        finally:
            host_array[0] -= 1

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if name in aten and not (name.startswith("lift_fresh") and host_array[0]):
                raise HostSyncError(f"host synchronisation: aten::{name}")
            if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                       for i in (args[1] if len(args) > 1 else []) if i is not None):
                raise HostSyncError("host synchronisation: boolean-mask indexing")
            return func(*args, **(kwargs or {}))

    stack = contextlib.ExitStack()
    stack.enter_context(Functions())
    stack.enter_context(Ops())
    patch = pytest.MonkeyPatch()
    stack.callback(patch.undo)
    for module in (augment, *(m for m in _modules_using_to_device())):
        patch.setattr(module, "to_device", to_device)
    return stack


def _modules_using_to_device():
    import importlib
    for name in ("dogo.pipelines.backends.held",):
        yield importlib.import_module(name)


class KernelRecord:
    """What a region dispatches, op by op, as a CUDA graph holds it: each aten op's name, the shape, dtype, strides
    and device of every tensor it reads or makes, its other arguments (numbers, flags), and for each tensor the
    region did not make (what it reads of the state: weights, optimiser state, the lr, a static input) the storage
    it lives in. A captured step replays the same kernels with the same arguments on the same memory at every step:
    two steps whose records differ cannot be replayed from one capture (a Python number that changes from step to
    step, a tensor rebound between steps, a shape that depends on the data, an allocation that changes)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        record = self

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                reads = record._describe((args, kwargs))
                out = func(*args, **kwargs)
                record._made.update(_storages(out))  # what it writes is described by shape (made here or read)
                record.ops.append((str(func), reads, record._describe(out)))
                return out

        self.ops: list[tuple] = []
        self._made: set[int] = set()
        self._mode = Record()

    def _describe(self, tree) -> tuple:
        import torch
        from torch.utils._pytree import tree_flatten
        out = []
        for x in tree_flatten(tree)[0]:
            if isinstance(x, torch.Tensor):
                storage = x.untyped_storage().data_ptr()
                out.append((tuple(x.shape), x.dtype, x.stride(), x.storage_offset(), str(x.device),
                            "made here" if storage in self._made else storage))
            elif isinstance(x, (bool, int, str, type(None), torch.dtype, torch.device, torch.layout,
                                torch.memory_format)):
                out.append(x)
            elif isinstance(x, float):
                out.append(repr(x))  # nan compares equal to itself as text
            else:  # a profiler handle, a generator: its kind (its address changes from call to call)
                out.append(type(x).__name__)
        return tuple(out)

    def __enter__(self) -> "KernelRecord":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def _storages(tree) -> list[int]:
    import torch
    from torch.utils._pytree import tree_flatten
    return [x.untyped_storage().data_ptr() for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def loader_spec(size: int, recipe=None, batch: int = 8, n_views: int = 2, seed: int = 0, rank: int = 0,
                world: int = 1, **options):
    """A LoaderSpec of one group of views of `size` on the CPU, for tests that build a loader directly: an even
    n_views is the default plan's two views per set in n_views // 2 sets (DoGo's four views), an odd one a group
    of that many. options: the spec's other fields (dtype, channels_last)."""
    import torch

    from dogo.engine.config import AugmentConfig
    from dogo.engine.config.schema import ViewGroup
    from dogo.pipelines import LoaderSpec
    from dogo.pipelines.views import plan_of
    recipe = recipe if recipe is not None else AugmentConfig(place="device")
    group, sets = (ViewGroup(count=2), n_views // 2) if n_views % 2 == 0 else (ViewGroup(count=n_views), 1)
    return LoaderSpec(plan=plan_of(recipe, {"global": group}, size, sets), recipe=recipe, global_batch=batch,
                      seed=seed, rank=rank, world_size=world, device=torch.device("cpu"), **options)


def views_of(batch) -> list:
    """A batch of the default plan as its list of views (b rows each), in stream order: 0, 1 (, 2, 3)."""
    return list(batch.groups[0].split(batch.labels.shape[0]))

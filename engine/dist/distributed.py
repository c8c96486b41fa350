"""torch.distributed under torchrun (NCCL on GPUs, gloo on CPUs), and a single process without it: joining the
process group and the collectives the engine uses.

Everything here also works at world size 1 without a process group, so losses and the loop never branch on it.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dogo.core.errors import ConfigError


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """The resolved config's device (cpu or cuda) as this rank's torch device."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but torch sees no CUDA device; use device=auto or device=cpu")
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise ValueError(f"device={device!r} is not resolved: load the config with dogo.engine.config.load")
    return torch.device("cpu")


def init(device: str, backend: str = "gloo", timeout_min: float = 30.0) -> DistContext:
    """Join the process group that torchrun describes in the environment, if any (device and backend: the resolved
    config's)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=dev if dev.type == "cuda" else None)
    return DistContext(rank, world_size, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# torch 2.14 renamed the tensor collectives and warns (FutureWarning) at every call of the old names: on each rank,
# in every step; the torch a GPU machine may already have (2.11) has only the old ones
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of x, in rank order (one collective, no autograd); x itself at world size 1."""
    if world_size() == 1:
        return x
    out = torch.empty((world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x.contiguous())
    return out


def reduce_scatter_rows(full: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `full` (every rank's gradient of gathered rows), of which each rank keeps the rows it
    owns: the backward of all_gather_rows."""
    if world_size() == 1:
        return full
    out = torch.empty((full.shape[0] // world_size(), *full.shape[1:]), dtype=full.dtype, device=full.device)
    _reduce_scatter_single(out, full.contiguous())
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather_rows with a gradient: backward sums every rank's gradient of the gathered tensor and keeps this
    rank's rows. With DDP averaging parameter gradients over ranks, the update equals the one a single process
    computes on the global batch with the mean of the ranks' losses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return all_gather_rows(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return reduce_scatter_rows(grad)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank in rank order; the identity at world size 1."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


class _SumWithGrad(torch.autograd.Function):
    """The sum over ranks with a gradient: every rank's output is the same sum, so the gradient of each rank's
    input is the sum over ranks of the output's gradient. (torch.distributed.nn.functional.all_reduce computes the
    same, and warns FutureWarning at every call in torch 2.14.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone(memory_format=torch.contiguous_format)  # the collective works in place
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """x summed over every rank, differentiably (the identity at world size 1)."""
    if world_size() == 1:
        return x
    return _SumWithGrad.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

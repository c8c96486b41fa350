"""torch.distributed under torchrun (NCCL on GPUs, gloo on CPUs), and a single process without it.

Everything here also works at world size 1 without a process group, so losses and the loop never branch on it.
"""
from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn


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


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA device; use device=auto or device=cpu")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device: str = "auto", backend: str = "auto", timeout_min: float = 30.0) -> DistContext:
    """Join the process group that torchrun describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if backend == "nccl" and dev.type != "cuda":
            raise RuntimeError("distributed.backend=nccl needs CUDA devices; use distributed.backend=gloo on CPUs")
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


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums every rank's gradient of the gathered tensor and keeps this rank's rows.

    With DDP averaging parameter gradients over ranks, this makes the update equal to the one a single process
    computes on the global batch with the mean of the ranks' losses.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank in rank order; the identity at world size 1."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch statistics over every rank, on any device and process group (NCCL or gloo).

    The per-channel sums travel through an autograd-aware all-reduce, so the gradient is exact. Every rank holds
    the same number of rows (base.Shard), so the count is known on the host: unlike torch's SyncBatchNorm, which
    gathers per-rank counts and indexes them with a boolean mask (a host synchronisation in every BN layer), nothing
    here waits for the device.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        channels = x.shape[1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        xf = x.float()
        n = x.numel() / channels * world_size()  # values per channel over all ranks
        # Two passes (mean, then centred squares) rather than E[x^2] - mean^2, which cancels badly in fp32.
        mean = dist_nn.all_reduce(xf.sum(dims)) / n
        centred = xf - mean.view(shape)
        var = dist_nn.all_reduce(centred.square().sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None is torch's cumulative average, 1 / batches seen (a tensor: no host sync)
                m = self.momentum if self.momentum is not None else self.num_batches_tracked.reciprocal().float()
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_((var.detach() * (n / (n - 1))).to(self.running_var.dtype), m)
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:  # SimSiam's projector ends in a BN without affine parameters
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm of `module` as an AllReduceBatchNorm with the same state, on CUDA and on CPUs."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        new = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module


class StopRequest:
    """SIGTERM/SIGINT set a flag; all ranks agree on it without stalling the device.

    Ranks may receive a signal one step apart, so the flag is max-reduced over a gloo group on the host, started
    asynchronously at one step and read at the next: the agreement costs no device synchronisation.
    """

    def __init__(self, ctx: DistContext):
        self.local = False
        self._group = dist.new_group(backend="gloo") if ctx.distributed else None
        self._flag = torch.zeros(1)
        self._work = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.local = True

    def should_stop(self) -> bool:
        """Call once per step, identically on every rank."""
        if self._group is None:
            return self.local
        agreed = False
        if self._work is not None:
            self._work.wait()
            agreed = bool(self._flag.item())
        self._flag = torch.tensor([float(self.local)])
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed

    def close(self) -> None:
        if self._work is not None:
            self._work.wait()
        for sig, old in self._old.items():
            signal.signal(sig, old)


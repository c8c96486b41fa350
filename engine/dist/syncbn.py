"""SimCLR's global BatchNorm: batch statistics over every rank, exact, with no host synchronisation."""
from __future__ import annotations

import torch
import torch.nn as nn

from dogo.engine.dist.distributed import sum_with_grad, world_size


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch statistics over every rank, on any device and process group (NCCL or gloo).

    The per-channel sums travel through an autograd-aware all-reduce (distributed.sum_with_grad), so the gradient
    is exact. Every rank holds the same number of rows (base.Shard), so the count is known on the host: unlike
    torch's SyncBatchNorm, which gathers per-rank counts and indexes them with a boolean mask (a host
    synchronisation in every BN layer), nothing here waits for the device.
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
        mean = sum_with_grad(xf.sum(dims)) / n
        centred = xf - mean.view(shape)
        var = sum_with_grad(centred.square().sum(dims)) / n
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

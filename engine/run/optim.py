"""Optimisers over both peers' parameter groups, and the learning-rate schedule as a pure function of the step.

With `static_lr` (precision.cuda_graphs) every group's lr lives in a device tensor that the optimiser's kernels read,
and set_lr writes the step's value into it: a captured step (engine/run/graphs.py) replays kernels whose arguments
were fixed at capture, so a Python float lr would stay at the capture step's value."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn


def lr_factor(step: int, total_steps: int, warmup_steps: int, final_ratio: float = 0.0) -> float:
    """Linear warm-up from 0 over `warmup_steps`, then cosine from 1 to `final_ratio` at `total_steps`."""
    if not 0 <= step <= total_steps:
        raise ValueError(f"step {step} outside the schedule of {total_steps} steps")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _trust_ratios(params: list[torch.Tensor], grads: list[torch.Tensor], eta: float) -> list[torch.Tensor]:
    """eta ||w|| / ||g|| per tensor, or 1 where either norm is 0: computed on one stacked vector, so a group of
    any size costs about ten dispatches instead of seven per tensor."""
    w, g = torch.stack(torch._foreach_norm([*params, *grads])).chunk(2)
    return list(torch.where((w > 0) & (g > 0), eta * w / g, 1.0).unbind())


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al.), as SimCLR uses it.

    Groups with `lars=False` (biases and norms) get neither weight decay nor adaptation. The trust ratio is
    computed on the device (no host synchronisation): eta * ||w|| / ||g + wd * w||, or 1 where a norm is 0.
    Under a GradScaler (fp16) it unscales the gradients itself and skips a step with inf/NaN gradients on the device
    (`grad_scale`, `found_inf`: GradScaler's contract for optimisers that handle scaling), so the scaler never reads
    found_inf on the host.
    """
    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler.step around this call
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if grad_scale is not None:
                grads = torch._foreach_div(grads, grad_scale)
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["lars"]:
                grads = torch._foreach_mul(grads, _trust_ratios(params, grads, group["trust_coefficient"]))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            # the lr multiplies first, then subtracts: the same kernels whether it is a float or a device tensor
            # (static_lr), so the two give bit-identical steps
            if found_inf is None:
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, grads)
                torch._foreach_sub_(params, torch._foreach_mul(bufs, group["lr"]))
                continue
            # a step with inf/NaN gradients leaves buffers and weights as they were, decided on the device
            skip = found_inf > 0
            new_bufs = torch._foreach_add(torch._foreach_mul(bufs, group["momentum"]), grads)
            new_params = torch._foreach_sub(params, torch._foreach_mul(new_bufs, group["lr"]))
            for old, new in zip(bufs + params, new_bufs + new_params):
                old.copy_(torch.where(skip, old, new))


def _no_decay(name: str, param: nn.Parameter, listed: set[str]) -> bool:
    """Biases and normalisation parameters (every tensor of rank <= 1) are never decayed, nor what the backbone's
    library lists (a ViT's position embedding and class token, as timm's and DINO's optimisers group them)."""
    return param.ndim <= 1 or name in listed


def param_groups(peers: dict[str, nn.Module], cfg, global_batch: int) -> list[dict]:
    """Two groups per peer (decayed, not decayed), each with its peer's base learning rate scaled by batch/256."""
    groups = []
    for name, module in peers.items():
        peer_cfg = cfg.peers[name]
        lr = (peer_cfg.lr if peer_cfg.lr is not None else cfg.optim.lr) * global_batch / 256
        wd = peer_cfg.weight_decay if peer_cfg.weight_decay is not None else cfg.optim.weight_decay
        decay, plain = [], []
        listed = getattr(module, "no_weight_decay", set())
        for pname, p in module.named_parameters():
            if p.requires_grad:
                (plain if _no_decay(pname, p, listed) else decay).append(p)
        groups.append(dict(params=decay, peer=name, base_lr=lr, lr=lr, weight_decay=wd, lars=True))
        groups.append(dict(params=plain, peer=name, base_lr=lr, lr=lr, weight_decay=0.0, lars=False))
    return groups


def build_optimizer(peers: dict[str, nn.Module], cfg, global_batch: int, device: torch.device,
                    static_lr: bool = False) -> torch.optim.Optimizer:
    """static_lr: each peer's lr in a device tensor (shared by its two groups) that set_lr fills, for a step
    captured in a CUDA graph; SGD and AdamW then take their fused kernels on every device (torch's foreach ones
    read a tensor lr on the host), AdamW also capturable (its step counts stay on the device)."""
    groups = param_groups(peers, cfg, global_batch)
    if static_lr:
        tensors = {}
        for group in groups:  # one tensor per peer: both its groups share the peer's lr
            group["lr"] = tensors.setdefault(group["peer"], torch.full((), group["lr"], device=device))
    o = cfg.optim
    if o.name == "lars":
        return LARS(groups, lr=groups[0]["lr"], momentum=o.momentum, trust_coefficient=o.trust_coefficient)
    # fused kernels on CUDA, foreach (one launch per group of tensors) elsewhere
    fast = {"fused": True} if device.type == "cuda" or static_lr else {"foreach": True}
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=o.momentum, **fast)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=o.betas, eps=o.eps, capturable=static_lr, **fast)
    raise ValueError(f"optim.name={o.name!r} is not one of lars, sgd, adamw")


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group's lr to its base lr times `factor`: a Python float, or written into the group's device tensor
    (static_lr; a fill, no host synchronisation). Either way the number is rounded to float32 first: the fused
    kernels read a tensor lr as float32 and a Python one as float64, and the eager and the captured step should
    take the same steps (a relative change below 6e-8)."""
    filled = set()
    for group in optimizer.param_groups:
        lr = float(np.float32(group["base_lr"] * factor))
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = lr
        elif id(group["lr"]) not in filled:  # a peer's two groups share one tensor: one fill
            group["lr"].fill_(lr)
            filled.add(id(group["lr"]))


def current_lr(group: dict) -> float:
    """A group's lr as a number (a read of the device at log steps, where its lr is a tensor)."""
    return float(group["lr"])

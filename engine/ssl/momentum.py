"""The momentum-encoder part a method reuses (MoCo's key encoder, BYOL's target network): an EMA copy of a peer
that follows it after every step, and, for a method with one, a queue of earlier keys.

It sits outside the DDP-wrapped peers (DDP would broadcast a 32 MB queue every step as a buffer), so every rank keeps
its own copy; the copies stay equal because they follow equal peers and a queue receives the keys of every rank.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from dogo.engine.ssl.losses import normalize


def momentum_at(base: float, schedule: str, step: int, total_steps: int) -> float:
    """MoCo's constant momentum, or BYOL's cosine increase from `base` at step 0 to 1 at the last step."""
    if schedule == "constant":
        return base
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2


class MomentumEncoder(nn.Module):
    """An EMA copy of a peer (backbone and projection head; not its predictor).

    It runs in training mode, so its BatchNorm normalises with the batch's statistics, as MoCo's and BYOL's do.
    (MoCo shuffles the batch across GPUs first so that BN cannot leak which key belongs to which query; here each
    rank's BN sees its own images only.)
    """

    def __init__(self, peer: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(peer).requires_grad_(False)
        if getattr(self.encoder, "predictor", None) is not None:
            self.encoder.predictor = None  # the predictor is the online network's alone

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of `images`."""
        return normalize(self.encoder(images))

    @torch.no_grad()
    def follow(self, peer: nn.Module, momentum: float) -> None:
        """target = momentum * target + (1 - momentum) * online, for every parameter (BN buffers are the copy's
        own)."""
        online = dict(peer.named_parameters())
        pairs = [(p, online[name].detach()) for name, p in self.encoder.named_parameters() if name in online]
        targets, values = [p for p, _ in pairs], [v for _, v in pairs]
        torch._foreach_mul_(targets, momentum)
        torch._foreach_add_(targets, values, alpha=1 - momentum)


class KeyQueue(nn.Module):
    """A ring buffer of L2-normalised keys, the negatives of a method with a queue (MoCo).

    It starts full of random unit keys, as MoCo's (a normalised Gaussian), drawn from `seed` alone so that every rank
    starts with the same queue; the first step then has negatives like every other step.
    """

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        start = torch.randn(size, dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("queue", normalize(start))
        self.ptr = 0  # next row to write: the oldest key

    def get_extra_state(self) -> dict:
        return {"ptr": self.ptr}

    def set_extra_state(self, state: dict) -> None:
        self.ptr = state["ptr"]

    def negatives(self) -> torch.Tensor:
        return self.queue

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the rows of `keys` after the newest ones, wrapping around and overwriting the oldest."""
        size, n = self.queue.shape[0], keys.shape[0]
        if n > size:
            raise ValueError(f"{n} keys do not fit a queue of {size}")
        rows = (self.ptr + torch.arange(n, device=self.queue.device)) % size
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.ptr = (self.ptr + n) % size


def module_bytes(module: nn.Module) -> int:
    """Parameters and buffers (memory accounting; works on the meta device)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))

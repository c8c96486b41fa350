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

from dogo.engine.dist.distributed import all_reduce_mean
from dogo.engine.ssl.losses import normalize


def momentum_at(base: float, schedule: str, step: int, total_steps: int) -> float:
    """MoCo's constant momentum, or BYOL's cosine increase from `base` at step 0 to 1 at the last step."""
    if schedule == "constant":
        return base
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2


class MomentumEncoder(nn.Module):
    """An EMA copy of a peer (backbone and projection head; its predictor too with keep_predictor: DINO's teacher
    has the student's prototypes).

    It runs in training mode, so its BatchNorm normalises with the batch's statistics, as MoCo's and BYOL's do.
    (MoCo shuffles the batch across GPUs first so that BN cannot leak which key belongs to which query; here each
    rank's BN sees its own images only.)

    The step's momentum m (and 1 - m) live in device tensors that `set_momentum` writes on the host before the step
    and `follow` reads: a step captured in a CUDA graph (precision.cuda_graphs) then follows BYOL's schedule, which
    changes m at every step. Not saved: the schedule sets it again at the next step; until then it is `momentum`, the
    schedule's start.
    """

    def __init__(self, peer: nn.Module, momentum: float, keep_predictor: bool = False):
        super().__init__()
        self.encoder = copy.deepcopy(peer).requires_grad_(False)
        if getattr(self.encoder, "predictor", None) is not None and not keep_predictor:
            self.encoder.predictor = None  # BYOL's predictor is the online network's alone
        self.register_buffer("momentum", torch.zeros(()), persistent=False)
        self.register_buffer("one_minus_momentum", torch.zeros(()), persistent=False)
        self.set_momentum(momentum)

    def set_momentum(self, momentum: float) -> None:
        """This step's momentum (both numbers computed on the host in float64, as a Python float would be)."""
        self.momentum.fill_(momentum)
        self.one_minus_momentum.fill_(1 - momentum)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of `images`."""
        return normalize(self.encoder(images))

    @torch.no_grad()
    def follow(self, peer: nn.Module) -> None:
        """target = m * target + (1 - m) * online, for every parameter (BN buffers are the copy's own), with the
        momentum set_momentum gave."""
        online = dict(peer.named_parameters())
        pairs = [(p, online[name].detach()) for name, p in self.encoder.named_parameters() if name in online]
        targets, values = [p for p, _ in pairs], [v for _, v in pairs]
        torch._foreach_mul_(targets, self.momentum)
        torch._foreach_add_(targets, torch._foreach_mul(values, self.one_minus_momentum))


class KeyQueue(nn.Module):
    """A ring buffer of L2-normalised keys, the negatives of a method with a queue (MoCo).

    It starts full of random unit keys, as MoCo's (a normalised Gaussian), drawn from `seed` alone so that every rank
    starts with the same queue; the first step then has negatives like every other step. The write position lives
    on the device and moves in place, so a step captured in a CUDA graph writes where the last one stopped.
    """

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        start = torch.randn(size, dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("queue", normalize(start))
        # next row to write (the oldest key); saved through the extra state, as a number
        self.register_buffer("position", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def ptr(self) -> int:
        """The next row to write, read from the device: for checkpoints and tests, never in the step."""
        return int(self.position)

    def get_extra_state(self) -> dict:
        return {"ptr": self.ptr}

    def set_extra_state(self, state: dict) -> None:
        self.position.fill_(state["ptr"])  # in place: a captured step keeps reading this tensor

    def negatives(self) -> torch.Tensor:
        return self.queue

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the rows of `keys` after the newest ones, wrapping around and overwriting the oldest."""
        size, n = self.queue.shape[0], keys.shape[0]
        if n > size:
            raise ValueError(f"{n} keys do not fit a queue of {size}")
        rows = (self.position + torch.arange(n, device=self.queue.device)) % size
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.position.add_(n).remainder_(size)


def module_bytes(module: nn.Module) -> int:
    """Parameters and buffers (memory accounting; works on the meta device)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def centred_softmax(scores: torch.Tensor, centre: torch.Tensor, temperature) -> torch.Tensor:
    """DINO's teacher distribution: softmax((scores - centre) / temperature) over the prototypes."""
    return torch.softmax((scores - centre) / temperature, dim=-1)


@torch.no_grad()
def follow_centre(centre: torch.Tensor, scores: torch.Tensor, momentum: float) -> None:
    """centre <- m centre + (1 - m) mean of `scores` over every rank's rows (equal local batches: the global mean),
    in place, as DINO's update_center."""
    centre.mul_(momentum).add_(all_reduce_mean(scores.mean(dim=0, keepdim=True)), alpha=1 - momentum)

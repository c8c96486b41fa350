"""The parts of a run that make per-step targets without gradient: the momentum key encoders of the methods that
have one (MoCo v2's, with its queue of negatives), and DisCo's frozen teacher.

They sit outside the DDP-wrapped peers (DDP would broadcast a 32 MB queue every step as a buffer), so every rank
keeps its own copy; the copies stay equal because the key encoders follow equal peers and the queues receive the
keys of every rank.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from dogo.engine.checkpoint import CheckpointError
from dogo.engine.config import Config, ConfigError
from dogo.engine.distributed import all_gather_rows
from dogo.engine.losses import normalize
from dogo.engine.methods import METHODS
from dogo.engine.objectives import objective_named
from dogo.engine.teacher import FrozenTeacher, load_teacher


def momentum_at(base: float, schedule: str, step: int, total_steps: int) -> float:
    """MoCo's constant momentum, or BYOL's cosine increase from `base` at step 0 to 1 at the last step."""
    if schedule == "constant":
        return base
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2


class KeyEncoder(nn.Module):
    """A peer's momentum copy (backbone and head) and, for a method with a queue, a ring buffer of L2-normalised
    keys, the negatives (queue_size 0: none).

    The queue starts full of random unit keys, as MoCo's (a normalised Gaussian), drawn from `seed` alone so that
    every rank starts with the same queue; the first step then has negatives like every other step.
    The key encoder runs in training mode, so its BatchNorm normalises with the batch's statistics as MoCo's does.
    (MoCo shuffles the batch across GPUs first so that BN cannot leak which key belongs to which query; here each
    rank's BN sees its own images only.)
    """

    def __init__(self, peer: nn.Module, queue_size: int, seed: int = 0):
        super().__init__()
        self.encoder = copy.deepcopy(peer).requires_grad_(False)
        dim = peer.head[3].out_features
        start = torch.randn(queue_size, dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("queue", normalize(start) if queue_size else start)
        self.ptr = 0  # next row to write: the oldest key

    def get_extra_state(self) -> dict:
        return {"ptr": self.ptr}

    def set_extra_state(self, state: dict) -> None:
        self.ptr = state["ptr"]

    def negatives(self) -> torch.Tensor:
        return self.queue

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(self.encoder(images))

    @torch.no_grad()
    def follow(self, peer: nn.Module, momentum: float) -> None:
        """key = momentum * key + (1 - momentum) * query, for every parameter (BN buffers are the key's own)."""
        query = dict(peer.named_parameters())
        keys = [p for name, p in self.encoder.named_parameters() if name in query]
        values = [query[name].detach() for name, _ in self.encoder.named_parameters() if name in query]
        torch._foreach_mul_(keys, momentum)
        torch._foreach_add_(keys, values, alpha=1 - momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the rows of `keys` after the newest ones, wrapping around and overwriting the oldest."""
        size, n = self.queue.shape[0], keys.shape[0]
        if n > size:
            raise ValueError(f"{n} keys do not fit a queue of {size}")
        rows = (self.ptr + torch.arange(n, device=self.queue.device)) % size
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.ptr = (self.ptr + n) % size


@dataclass
class Targets:
    """One step's targets. keys: peer -> (k1, k2), its key encoder's normalised embeddings of the views (k1 is None
    in MoCo's own one-direction form, which needs view 2's keys only);
    queues: peer -> the negatives; teacher: peer -> (t1, t2), the teacher's embeddings of that peer's views."""
    keys: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    queues: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class TargetMakers(nn.Module):
    """Key encoders for the peers whose method has one and, for an objective with a teacher, the teacher. Built from
    the peers at their initial weights."""

    def __init__(self, cfg: Config, peers: nn.ModuleDict):
        super().__init__()
        self.cfg = cfg
        self.methods = {name: METHODS[p.ssl] for name, p in cfg.peers.items()}
        # each peer's queue from its own seed, the same on every rank
        self.key_encoders = nn.ModuleDict({
            name: KeyEncoder(peers[name], p.queue_size if self.methods[name].queue else 0, seed=cfg.seed + k)
            for k, (name, p) in enumerate(cfg.peers.items()) if self.methods[name].momentum_encoder})
        self.teacher: FrozenTeacher | None = None
        if objective_named(cfg.objective.name).uses_teacher:
            self.teacher = load_teacher(cfg.teacher)
            for name, p in cfg.peers.items():
                if p.head_out != self.teacher.embedding_dim:
                    raise ConfigError(
                        f"peers.{name}.head_out={p.head_out} but the teacher ({self.teacher.source}) embeds in "
                        f"{self.teacher.embedding_dim} dimensions; DisCo compares the two embeddings, so set "
                        f"peers.{name}.head_out={self.teacher.embedding_dim}")

    @property
    def active(self) -> bool:
        return bool(self.key_encoders) or self.teacher is not None

    def make(self, views: list[torch.Tensor], pairs: dict[str, tuple[int, int]]) -> Targets:
        """Keys and teacher embeddings of this step's views (call under the run's autocast)."""
        out = Targets()
        for name, enc in self.key_encoders.items():
            want = [v for v, needed in zip(pairs[name], self.methods[name].key_views(self.cfg.peers[name])) if needed]
            keys = enc.keys(torch.cat([views[v] for v in want])).chunk(len(want))  # one forward for all its views
            made = dict(zip(want, keys))
            out.keys[name] = tuple(made.get(v) for v in pairs[name])
            out.queues[name] = enc.negatives()
        if self.teacher is not None:
            seen: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
            for name in self.cfg.peers:
                pair = pairs[name]
                if pair not in seen:  # students that share views share the teacher's forward
                    seen[pair] = self.teacher.embed_views(views[pair[0]], views[pair[1]])
                out.teacher[name] = seen[pair]
        return out

    def after_step(self, peers: nn.ModuleDict, targets: Targets, step: int, total_steps: int) -> None:
        """Enqueue every rank's keys of a method with a queue (MoCo: view 2's; both views' in the symmetric form), then
        move each key encoder towards its updated peer."""
        for name, enc in self.key_encoders.items():
            if self.methods[name].queue:
                keys = [k for k in targets.keys[name] if k is not None]
                gathered = all_gather_rows(torch.cat(keys, dim=1))  # one collective for both views
                enc.enqueue(torch.cat(gathered.chunk(len(keys), dim=1)))  # every rank's view-1 keys, then view-2's
            p = self.cfg.peers[name]
            enc.follow(peers[name], momentum_at(p.momentum, p.momentum_schedule, step, total_steps))

    def checkpoint_state(self) -> dict:
        """What a resume needs: key encoders and queues; the teacher only as a fingerprint (it is read from its
        source again)."""
        return {"key_encoders": self.key_encoders.state_dict(),
                "teacher_sha256": self.teacher.sha256 if self.teacher is not None else None}

    def load_checkpoint_state(self, state: dict, path) -> None:
        self.key_encoders.load_state_dict(state["key_encoders"])
        if self.teacher is not None and state["teacher_sha256"] != self.teacher.sha256:
            raise CheckpointError(f"the teacher ({self.teacher.source}) is not the one {path} was trained with: its "
                             f"weights have changed; point teacher.* at the original, or start a new run")

"""The parts of a run that make per-step targets without gradient: each peer's method state (a momentum encoder, a
queue: dogo.engine.ssl.methods) and DisCo's frozen teacher. The trainer calls `schedule` on the host before each step,
`make` before the loss and `after_step` after the update; the method states go into checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from dogo.engine.config import Config
from dogo.core.errors import CheckpointError, ConfigError
from dogo.core.registry import METHODS, OBJECTIVES
from dogo.engine.ssl.teacher import FrozenTeacher, load_teacher


@dataclass
class Targets:
    """One step's targets. method: peer -> what its method's state made (e.g. MoCo's keys and negatives);
    teacher: peer -> the teacher's embeddings of that peer's large crops, one (b, d) tensor per crop."""
    method: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)


class TargetMakers(nn.Module):
    """The method states of the peers whose method keeps one and, for an objective with a teacher, the teacher.
    Built from the peers at their initial weights (before SyncBN: MoCo's keys use each rank's own statistics)."""

    def __init__(self, cfg: Config, peers: nn.ModuleDict):
        super().__init__()
        self.cfg = cfg
        states = {}
        for k, (name, p) in enumerate(cfg.peers.items()):
            state = METHODS.get(p.ssl, f"peers.{name}.ssl").make_state(p, peers[name], seed=cfg.seed + k)
            if state is not None:  # each peer's from its own seed, the same on every rank
                states[name] = state
        self.states = nn.ModuleDict(states)
        self.teacher: FrozenTeacher | None = None
        if OBJECTIVES.get(cfg.objective.name, "objective.name").uses_teacher:
            self.teacher = load_teacher(cfg.teacher, cfg.data.image_size)
            for name, p in cfg.peers.items():
                if p.head_out != self.teacher.embedding_dim:
                    raise ConfigError(
                        f"peers.{name}.head_out={p.head_out} but the teacher ({self.teacher.source}) embeds in "
                        f"{self.teacher.embedding_dim} dimensions; DisCo compares the two embeddings, so set "
                        f"peers.{name}.head_out={self.teacher.embedding_dim}")

    @property
    def active(self) -> bool:
        return bool(self.states) or self.teacher is not None

    def make(self, batch, plan, sets: dict[str, int]) -> Targets:
        """The method states' targets and the teacher's embeddings of this step's large crops only (batch: a
        pipelines.ViewBatch; plan: its ViewPlan; sets: peer -> its set of views), under the run's autocast: momentum
        networks and the teacher never see the local crops."""
        out = Targets()
        for name, state in self.states.items():
            out.method[name] = state.targets(batch.large(plan, sets[name]), plan.large)
        if self.teacher is not None:
            seen: dict[int, tuple[torch.Tensor, ...]] = {}
            for name in self.cfg.peers:
                s = sets[name]
                if s not in seen:  # students that share views share the teacher's forward
                    seen[s] = self.teacher.embed(batch.large(plan, s), plan.large).chunk(plan.large)
                out.teacher[name] = seen[s]
        return out

    def schedule(self, step: int, total_steps: int) -> None:
        """Before the step that makes `step` steps in all: each method state's scheduled numbers (a momentum),
        written into the device tensors the step reads (outside any captured region)."""
        for state in self.states.values():
            state.schedule(step, total_steps)

    def after_step(self, peers: nn.ModuleDict, targets: Targets) -> None:
        for name, state in self.states.items():
            state.after_step(peers[name], targets.method[name])

    def checkpoint_state(self) -> dict:
        """What a resume needs: the method states; the teacher only as a fingerprint (it is read from its source
        again)."""
        return {"method_states": self.states.state_dict(),
                "teacher_sha256": self.teacher.sha256 if self.teacher is not None else None}

    def load_checkpoint_state(self, state: dict, path) -> None:
        if "method_states" not in state:
            raise CheckpointError(f"{path} was written by an older dogo whose momentum encoders this one cannot read; "
                                  f"start a new run (checkpoint.resume=none)")
        self.states.load_state_dict(state["method_states"])
        if self.teacher is not None and state["teacher_sha256"] != self.teacher.sha256:
            raise CheckpointError(f"the teacher ({self.teacher.source}) is not the one {path} was trained with: its "
                                  f"weights have changed; point teacher.* at the original, or start a new run")

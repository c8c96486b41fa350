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
from dogo.engine.ssl.momentum import centred_softmax, follow_centre
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
        self.distill_prototypes = False  # DisCo's target: the teacher's prototype distribution (else its embedding)
        if OBJECTIVES.get(cfg.objective.name, "objective.name").uses_teacher:
            self.teacher = load_teacher(cfg.teacher, cfg.data.image_size)
            if cfg.objective.distill_target == "prototypes":
                self._init_prototype_target(cfg)
                return
            for name, p in cfg.peers.items():
                if p.head_out != self.teacher.embedding_dim:
                    raise ConfigError(
                        f"peers.{name}.head_out={p.head_out} but the teacher ({self.teacher.source}) embeds in "
                        f"{self.teacher.embedding_dim} dimensions; DisCo compares the two embeddings, so set "
                        f"peers.{name}.head_out={self.teacher.embedding_dim}")

    def _init_prototype_target(self, cfg: Config) -> None:
        """DisCo with the DINOv2 distillation target: a DINO teacher, DINO students with as many prototypes, and the
        running centre of the teacher's scores (saved in checkpoints)."""
        k = self.teacher.prototypes
        if k == 0:
            raise ConfigError(f"objective.distill_target=prototypes needs a DINO teacher (a peer trained with "
                              f"ssl=dino, from teacher.checkpoint); {self.teacher.source} has no prototypes: use "
                              f"objective.distill_target=embedding")
        for name, p in cfg.peers.items():
            if p.ssl != "dino" or p.dino.prototypes != k:
                raise ConfigError(f"objective.distill_target=prototypes pulls each student's softmax over its "
                                  f"prototypes towards the teacher's over its {k}: peers.{name} needs ssl=dino and "
                                  f"dino.prototypes={k} (it has ssl={p.ssl}"
                                  + (f", dino.prototypes={p.dino.prototypes})" if p.ssl == "dino" else ")"))
        self.distill_prototypes = True
        self.register_buffer("teacher_center", torch.zeros(1, k))

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
                    seen[s] = self._teacher_targets(batch.large(plan, s), plan.large)
                out.teacher[name] = seen[s]
        return out

    def _teacher_targets(self, large: torch.Tensor, crops: int) -> tuple[torch.Tensor, ...]:
        """The teacher's embeddings of the large crops, one per crop; with distill_target=prototypes its centred,
        sharpened softmax over its prototypes instead (the students' dino.teacher_temp), and its raw scores last (the
        centre follows them after the step)."""
        if not self.distill_prototypes:
            return self.teacher.embed(large, crops).chunk(crops)
        scores = self.teacher.scores(large, crops).float()
        temp = next(iter(self.cfg.peers.values())).dino.teacher_temp
        return *centred_softmax(scores, self.teacher_center, temp).chunk(crops), scores

    def schedule(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Before the step that makes `step` steps in all: each method state's scheduled numbers (a momentum),
        written into the device tensors the step reads (outside any captured region)."""
        for state in self.states.values():
            state.schedule(step, total_steps, steps_per_epoch)

    @property
    def eager_steps(self) -> int:
        """The run's first steps that a CUDA graph may not capture (MethodState.eager_steps)."""
        return max((state.eager_steps for state in self.states.values()), default=0)

    def sync_batchnorm(self) -> None:
        """distributed.sync_bn on several ranks: the method states whose networks sync their statistics too."""
        for state in self.states.values():
            state.sync_batchnorm()

    def before_update(self, peers: nn.ModuleDict) -> None:
        for name, state in self.states.items():
            state.before_update(peers[name])

    def after_step(self, peers: nn.ModuleDict, targets: Targets) -> None:
        for name, state in self.states.items():
            state.after_step(peers[name], targets.method[name])
        if self.distill_prototypes:
            self._follow_teacher_centre(targets)

    def _follow_teacher_centre(self, targets: Targets) -> None:
        """centre <- m centre + (1 - m) mean of the teacher's scores over every rank's large crops (each set of views
        the teacher embedded once), m: the first student's dino.center_momentum."""
        scores = torch.cat([t[-1] for t in {id(t): t for t in targets.teacher.values()}.values()])
        follow_centre(self.teacher_center, scores, next(iter(self.cfg.peers.values())).dino.center_momentum)

    def checkpoint_state(self) -> dict:
        """What a resume needs: the method states; the teacher only as a fingerprint (it is read from its source
        again)."""
        return {"method_states": self.states.state_dict(),
                "teacher_sha256": self.teacher.sha256 if self.teacher is not None else None,
                "teacher_center": self.teacher_center.clone() if self.distill_prototypes else None}

    def load_checkpoint_state(self, state: dict, path) -> None:
        if "method_states" not in state:
            raise CheckpointError(f"{path} was written by an older dogo whose momentum encoders this one cannot read; "
                                  f"start a new run (checkpoint.resume=none)")
        self.states.load_state_dict(state["method_states"])
        if self.distill_prototypes:
            if state.get("teacher_center") is None:
                raise CheckpointError(f"{path} was trained with objective.distill_target=embedding; this run "
                                      f"distils prototypes: start a new run (checkpoint.resume=none) or keep the "
                                      f"embedding target")
            self.teacher_center.copy_(state["teacher_center"])
        if self.teacher is not None and state["teacher_sha256"] != self.teacher.sha256:
            raise CheckpointError(f"the teacher ({self.teacher.source}) is not the one {path} was trained with: its "
                                  f"weights have changed; point teacher.* at the original, or start a new run")

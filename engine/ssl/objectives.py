"""Objectives (`objective.name`): how the peers' methods combine into one loss. Every training step goes through
`objective_loss`.

- a method's name (simclr, mocov2, simsiam, ...: dogo.engine.ssl.methods): every peer learns alone with that method;
- dogo: two peers, each with its own method, plus each one's KL(P_peer || P_self) over cross-crop similarities, for
  every pair of crops with a large one;
- disco: students with their own methods, each pulled towards a frozen teacher's embeddings of the large crops.

An objective declares how many peers it takes, which views each peer sees and whether it needs the teacher; the
trainer and the config ask it. Peers' outputs are their Crops (engine/ssl/peers.py), large crops first.
"""
from __future__ import annotations

from typing import ClassVar, Mapping

import torch

from dogo.core.errors import ConfigError
from dogo.core.registry import METHODS, OBJECTIVES
from dogo.engine.ssl import losses
from dogo.engine.ssl.methods import Method
from dogo.engine.ssl.peers import Crops


class Objective:
    name: ClassVar[str]
    peers_needed: ClassVar[int | None] = None  # exactly this many peers, or any number
    uses_teacher: ClassVar[bool] = False
    kl: ClassVar[bool] = False  # DoGo's mutual KL between the two peers
    method: ClassVar[str | None] = None  # the one method every peer learns with, if the objective fixes it

    def check(self, cfg) -> None:
        n = len(cfg.peers)
        if self.peers_needed is not None and n != self.peers_needed:
            raise ConfigError(f"objective.name={self.name} needs exactly {self.peers_needed} peers, the config has "
                              f"{n}: {', '.join(cfg.peers)}")
        if cfg.objective.distill_target != "embedding" and not self.uses_teacher:
            raise ConfigError(f"objective.distill_target={cfg.objective.distill_target} is DisCo's (objective.name="
                              f"disco); objective.name={self.name} has no teacher to distil")
        self._check_crops(cfg)

    def _check_crops(self, cfg) -> None:
        """Alone, a method whose loss takes the two large crops only cannot use more crops: they would cost their
        forward and teach nothing (under DoGo or DisCo the KL or the distillation uses them)."""
        groups = list(cfg.views.values())
        if self.kl or self.uses_teacher or (len(groups) == 1 and groups[0].count == 2):
            return
        for name, peer in cfg.peers.items():
            if not METHODS.get(peer.ssl, f"peers.{name}.ssl").local_crops:
                raise ConfigError(f"objective.name={self.name}: {peer.ssl} uses the two large crops only (as "
                                  f"solo-learn's {peer.ssl}): views holds more; keep one group of two views, or "
                                  f"train simclr or byol with multi-crop (or {peer.ssl} under dogo or disco)")

    def view_sets(self, peer_names: list[str], share_views: bool) -> dict[str, int]:
        """Which set of the step's views each peer takes (pipelines/views.py): every peer the same, unless the
        objective gives each its own."""
        return {name: 0 for name in peer_names}

    def extra_terms(self, name: str, out, objective_cfg, targets, peer) -> dict[str, tuple[float, torch.Tensor]]:
        """Terms the objective adds to peer `name`'s loss: term name -> (weight, value)."""
        return {}

    def loss(self, outputs: Mapping[str, Crops], objective_cfg, peers, targets=None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        names = list(outputs)
        methods: dict[str, Method] = {name: METHODS.get(peers[name].ssl, f'peers.{name}.ssl') for name in names}
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=outputs[names[0]].z.device)

        # The tiled kernel: every contrastive peer's NT-Xent over all its crops and, with DoGo, both KL terms over
        # every pair of crops with a large one, in one walk.
        slots = names if self.kl else [name for name in names if methods[name].contrastive]
        if slots:
            if self.kl:
                partner = {name: slots[1 - k] for k, name in enumerate(slots)}
                pairs = [_as_crops(outputs[name], *methods[name].kl_embeddings(outputs[name],
                                                                                methods[partner[name]]))
                         for name in slots]
            else:
                pairs = [_as_crops(outputs[name], outputs[name].z, outputs[name].z) for name in slots]
            taus = [peers[name].tau if methods[name].contrastive else None for name in slots]
            first = outputs[slots[0]]
            values = losses.kernel_terms(pairs, taus, objective_cfg.tau_kl if self.kl else None,
                                         objective_cfg.tile, kl_pairs(first.large, first.crops))
            ntx = [name for name, tau in zip(slots, taus) if tau is not None]
            for k, name in enumerate(ntx):
                terms[f"{name}/ntxent"] = values[k]
            total = total + values[:len(ntx)].sum()
            if self.kl:
                for k, name in enumerate(slots):
                    terms[f"{name}/kl"] = values[len(ntx) + k]
                    total = total + peers[name].kl_weight * terms[f"{name}/kl"]

        for name in names:
            own = targets.method.get(name) if targets is not None else None
            for key, value in methods[name].loss(name, outputs[name], peers[name], own).items():
                terms[key] = value
                total = total + value
            extra = self.extra_terms(name, outputs[name], objective_cfg, targets, peers[name])
            for key, (weight, value) in extra.items():
                terms[key] = value
                total = total + weight * value

        terms = {key: value.detach() for key, value in terms.items()}
        terms["loss"] = total.detach()
        return total, terms


def _as_crops(out: Crops, own: torch.Tensor, target: torch.Tensor) -> tuple[list, list]:
    """A peer's (own, as_target) flat embeddings as lists of crops; the same list twice when they are one tensor
    (the kernel then walks the columns once for every term)."""
    own_crops = out.split(own)
    return own_crops, (own_crops if target is own else out.split(target))


def kl_pairs(large: int, crops: int) -> list[tuple[int, int]]:
    """DoGo's KL over crops: every pair of crops with at least one large one, the earlier as rows (two crops: view-1
    rows against view-2 columns, DoGo's own); local x local pairs are left out, as DINO, BYOL and MoCo pair every crop
    with a large one. 2 large + 6 local crops: 13 pairs."""
    return [(a, c) for a in range(large) for c in range(a + 1, crops)]


class SingleMethod(Objective):
    """Every peer alone with one method (objective.name = the method's name)."""

    def __init__(self, method: str):
        self.name = self.method = method


class DoGo(Objective):
    """Distill on the Go: two peers, each its own method plus kl_weight * KL(P_peer || P_self)."""
    name = "dogo"
    peers_needed = 2
    kl = True

    def view_sets(self, peer_names, share_views):
        """DoGo's code feeds each peer its own views of the images; share_views gives both the same."""
        return {name: 0 if share_views else k for k, name in enumerate(peer_names)}


class DisCo(Objective):
    """Distilled Contrastive learning: each student's own method plus distill_weight times the squared distance of
    its normalised embeddings to the frozen teacher's: the teacher embeds the large crops only, the student every
    crop (each local crop pulled towards every large crop's teacher embedding, weight 1 / large crops). With
    objective.distill_target=prototypes, a DINO teacher's centred softmax over its prototypes is the target of each
    DINO student's (a cross-entropy, the DINOv2 distillation recipe), paired over crops the same way."""
    name = "disco"
    uses_teacher = True

    def check(self, cfg) -> None:
        super().check(cfg)
        t = cfg.teacher
        files = bool(t.backbone or t.head)
        if bool(t.checkpoint) == files:
            raise ConfigError("objective.name=disco needs its teacher from exactly one source: teacher.checkpoint=RUN "
                              "(a dogo run folder or checkpoint, teacher.peer picking the peer; or a solo-learn or "
                              "lightly .ckpt with teacher.arch=NAME), or teacher.backbone=FILE with teacher.head=FILE "
                              "and teacher.arch=NAME")
        if files and not (t.backbone and t.head and t.arch):
            missing = [k for k in ("backbone", "head", "arch") if not getattr(t, k)]
            raise ConfigError(f"a teacher from state_dict files needs teacher.backbone, teacher.head and teacher.arch; "
                              f"missing: {', '.join('teacher.' + k for k in missing)}")

    def extra_terms(self, name, out, objective_cfg, targets, peer):
        if objective_cfg.distill_target == "prototypes":  # DINO students of a DINO teacher (engine/ssl/targets.py)
            *probs, _ = targets.teacher[name]
            student = out.split(losses.at_least_fp32(out.p))
            ce = losses.distill_cross_entropy(student, probs, peer.dino.student_temp)
            return {f"{name}/distill": (objective_cfg.distill_weight, ce)}
        distance = losses.disco_distance(out.split(out.z), targets.teacher[name])
        return {f"{name}/distill": (objective_cfg.distill_weight, distance)}


# objective.name: dogo, disco, or any method's name (every peer alone with that method)
for _objective in (*(SingleMethod(name) for name in METHODS), DoGo(), DisCo()):
    OBJECTIVES.register(_objective.name, _objective)


def objective_loss(outputs: Mapping[str, Crops], objective_cfg, peers, targets=None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss to backpropagate and its named terms (detached), for every peer.

    outputs: peer name -> its Crops: raw head outputs of every crop of this rank's images, large first, and a
    method's predictions. objective_cfg: ObjectiveConfig; peers: name -> resolved PeerConfig (ssl, tau, kl_weight).
    targets: what the parts without gradient computed for this step (dogo.engine.ssl.targets.Targets): momentum keys
    and queues, the DisCo teacher's embeddings of the large crops.
    """
    return OBJECTIVES.get(objective_cfg.name, "objective.name").loss(outputs, objective_cfg, peers, targets)

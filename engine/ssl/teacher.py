"""DisCo's teacher: a frozen backbone and projection head, from a dogo checkpoint, a solo-learn or lightly Lightning
checkpoint (engine/ssl/lightning_teacher.py), or plain state_dict files.

Frozen means: no parameter requires gradient, `.train()` changes nothing, and the forward runs under inference
mode (and the run's autocast). BatchNorm (`teacher.bn`) uses the running statistics (eval, our default) or each
view's batch statistics as DisCo's code does (batch); in both modes the running statistics are never updated. Its
weights never change; a checkpoint records their SHA-256 so that a resumed run can tell if the teacher's file has
changed underneath it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from dogo.core import checkpoint_files
from dogo.core.errors import CheckpointError, ConfigError
from dogo.engine.config import TeacherConfig, stored
from dogo.core.io import UnreadableFile, read_torch_file
from dogo.engine.ssl import lightning_teacher
from dogo.engine.ssl.peers import build_peer
from dogo.core.registry import BACKBONES
from dogo.models import Peer, Prototypes
from dogo.models.heads import head_shape


class FrozenTeacher(nn.Module):
    def __init__(self, peer: Peer, source: str, bn: str = "eval"):
        super().__init__()
        self.bn = bn
        self.peer = peer.requires_grad_(False)
        if bn == "batch":  # batch statistics without touching the buffers (torch's BN then passes them as None)
            for m in self.peer.modules():
                if isinstance(m, _BatchNorm):
                    m.track_running_stats = False
        self.train(False)
        self.source = source
        self.embedding_dim = peer.embedding_dim
        self.sha256 = state_fingerprint(peer.state_dict())  # once: the weights never change

    def train(self, mode: bool = True) -> "FrozenTeacher":
        """Whatever the trainer asks: BN in eval mode, or with bn=batch in training mode on batch statistics."""
        super().train(False)
        for m in self.peer.modules():
            if isinstance(m, _BatchNorm):
                m.training = self.bn == "batch"
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            z = self.peer(images)
        return z.clone()  # a normal tensor again: autograd may use it (as a constant) in the loss

    def embed(self, large: torch.Tensor, crops: int) -> torch.Tensor:
        """The embeddings of `crops` large crops, (crops * b, 3, S, S) crop after crop: one forward in eval mode;
        one per crop with batch statistics, as DisCo's code forwards the query and the key images separately."""
        if self.bn == "batch":
            return torch.cat([self(x) for x in large.chunk(crops)])
        return self(large)

    @property
    def prototypes(self) -> int:
        """How many prototypes its DINO head scores (0: it has none)."""
        predictor = self.peer.predictor
        return predictor.weight_v.shape[0] if isinstance(predictor, Prototypes) else 0

    def scores(self, large: torch.Tensor, crops: int) -> torch.Tensor:
        """A DINO teacher's scores over its prototypes for the large crops (as `embed`, through its prototypes)."""
        z = self.embed(large, crops)
        with torch.inference_mode():
            s = self.peer.predictor(z)
        return s.clone()


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_state(path: str, key: str) -> dict:
    p = Path(path)
    try:
        state = read_torch_file(p, "torch state_dict")
    except UnreadableFile as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # the common {'state_dict': ...} wrapping
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key}: {p} does not hold a state_dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP


def _load_into(module: nn.Module, state: dict, what: str) -> None:
    """load_state_dict(strict) with an error that lists what is missing, unexpected or of the wrong shape."""
    problem = checkpoint_files.state_mismatch(module, state)
    if problem:
        raise ConfigError(f"{what} does not match the architecture: {problem}")
    module.load_state_dict(state, strict=True)


def _from_checkpoint(t: TeacherConfig, image_size: int) -> tuple[Peer, str]:
    try:
        path = checkpoint_files.resolve(t.checkpoint)
        with torch.serialization.safe_globals(lightning_teacher.SAFE_GLOBALS):
            contents = read_torch_file(path, "checkpoint (dogo's, solo-learn's or lightly's)")
        if lightning_teacher.is_module_checkpoint(contents):
            return _from_lightning(contents, path, t, image_size)
        state = checkpoint_files.checked(contents, path)
        checkpoint_files.check_finite(state, path)
    except UnreadableFile as exc:
        raise ConfigError(f"teacher.checkpoint: {exc}{lightning_teacher.hint_for(exc)}") from None
    except CheckpointError as exc:
        raise ConfigError(f"teacher.checkpoint: {exc}") from None
    peers = list(state["peers"])
    name = t.peer or (peers[0] if len(peers) == 1 else "")
    if name not in state["peers"]:
        raise ConfigError(f"teacher.peer: {path} holds peers {', '.join(peers)}; "
                          + ("name one with teacher.peer=NAME" if not t.peer else f"there is no '{t.peer}'"))
    run_cfg = stored(state["config"])
    peer_cfg = run_cfg.peers[name]
    peer = build_peer(peer_cfg, run_cfg.data.image_size)
    _load_into(peer, state["peers"][name], f"teacher peer '{name}' of {path}")
    return peer, f"peer '{name}' ({peer_cfg.arch}) of {path}"


def _from_lightning(contents: dict, path: Path, t: TeacherConfig, image_size: int) -> tuple[Peer, str]:
    parts = lightning_teacher.teacher_parts(contents, path, t, image_size)
    try:
        checkpoint_files.refuse_diverged({**{f"backbone.{k}": v for k, v in parts.backbone.items()},
                                          **{f"head.{k}": v for k, v in parts.head.items()}}, str(path))
    except CheckpointError as exc:
        raise ConfigError(f"teacher.checkpoint: {exc}") from None
    _load_into(parts.peer.backbone, parts.backbone, f"the backbone of {parts.source}")
    _load_into(parts.peer.head, parts.head, f"the projection head of {parts.source}")
    return parts.peer, parts.source


def _from_files(t: TeacherConfig, image_size: int) -> tuple[Peer, str]:
    classifier = BACKBONES.get(t.arch, "teacher.arch").classifier_keys()  # a full library model's state_dict too
    backbone = {k: v for k, v in _load_state(t.backbone, "teacher.backbone").items() if not k.startswith(classifier)}
    head = _load_state(t.head, "teacher.head")
    try:
        shape = head_shape(head)
    except ValueError:
        raise ConfigError(f"teacher.head: {t.head} is not a projection head (no Linear weights; "
                          f"`dogo export --head` writes one)") from None
    peer = Peer(t.arch, t.cifar_stem, shape["hidden"], shape["out"], out_bn=shape["out_bn"],
                head_layers=shape["layers"], head_bias=shape["bias"], image_size=image_size, arch_args=t.arch_args)
    _load_into(peer.backbone, backbone, f"teacher.backbone {t.backbone} (as {t.arch})")
    _load_into(peer.head, head, f"teacher.head {t.head}")
    return peer, f"{t.arch} from {t.backbone} and {t.head}"


def load_teacher(t: TeacherConfig, image_size: int) -> FrozenTeacher:
    """The teacher for views of `image_size` (a timm ViT teacher from files is built for them)."""
    peer, source = _from_checkpoint(t, image_size) if t.checkpoint else _from_files(t, image_size)
    return FrozenTeacher(peer, source, t.bn)

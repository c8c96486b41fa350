"""A DisCo teacher from a solo-learn or lightly run: a Lightning checkpoint (.ckpt) holds the whole LightningModule's
state_dict, and each library names its backbone and projection head its own way.

- solo-learn (solo/methods/base.py): `backbone.*`, a torchvision ResNet with fc = Identity (for CIFAR its first
  conv is 3x3, stride 1, padding 2, and the max-pool is gone), and `projector.*`, an nn.Sequential. solo-learn
  1.0.2, the release on PyPI, calls the backbone `encoder`.
- lightly (its examples and benchmarks): `backbone.*`, a torchvision model with fc = Identity or
  nn.Sequential(*list(resnet.children())[:-1]) (the children by index), and `projection_head.layers.*` (lightly's
  ProjectionHead keeps its blocks in `layers`).

The projection head is rebuilt as the nn.Sequential it was: a Linear where a 2-D weight is (with its bias if it has
one), a BatchNorm1d where running statistics are (affine or not), and the activation at each index that holds no
tensors. A state_dict does not say which activation: `teacher.head_activation` does, ReLU by default (the heads of
SimCLR, MoCo, BYOL, SimSiam, VICReg, Barlow Twins, NNCLR, SwAV in both libraries), GELU for lightly's MSN and LeWM
heads and solo-learn's VIbCReg. DINO's head (prototypes after the MLP) is refused. Classifiers, momentum copies and
predictors in the checkpoint are left out. A checkpoint is a Lightning one, or any {"state_dict": ...} of one of the
two layouts (what is left when a checkpoint's other contents are dropped).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from dogo.core.errors import ConfigError
from dogo.core.registry import BACKBONES
from dogo.engine.config import TeacherConfig
from dogo.models import Peer


@dataclass(frozen=True)
class Layout:
    library: str
    backbones: tuple[str, ...]  # the backbone's prefixes, the first found is taken
    projector: str  # the nn.Sequential's prefix
    head: str  # the whole head's prefix: nothing but the Sequential may be under it
    # the 3x3 first conv's padding: solo-learn's CIFAR ResNet pads 2; lightly has none of its own, and a torchvision
    # ResNet given a CIFAR stem by its user usually pads 1
    cifar_padding: int


# solo-learn first: a lightly module has no `projector`, a solo-learn one no `projection_head`
LAYOUTS = (Layout("solo-learn", ("backbone.", "encoder."), "projector.", "projector.", cifar_padding=2),
           Layout("lightly", ("backbone.",), "projection_head.layers.", "projection_head.", cifar_padding=1))

# objects Lightning checkpoints hold besides tensors that a weights-only load may rebuild: hyperparameters saved
# from an argparse parser (anything else is refused by name, and the error says how to keep only the weights)
SAFE_GLOBALS = [argparse.Namespace]


def hint_for(unreadable: Exception) -> str:
    """What to do when a weights-only load refused a checkpoint's other objects (hyperparameters, say)."""
    if "weights-only load refuses" not in str(unreadable):
        return ""
    return (". A Lightning checkpoint whose other contents a safe load refuses works once they are dropped (if you "
            "trust the file): c = torch.load(FILE, weights_only=False); torch.save({'state_dict': c['state_dict']}, "
            "NEW.ckpt)")


def is_module_checkpoint(contents) -> bool:
    """What Lightning's Trainer.save_checkpoint writes (the module's state_dict beside the trainer's state), or a
    bare {"state_dict": ...}; never a dogo checkpoint (which holds peers)."""
    return isinstance(contents, dict) and isinstance(contents.get("state_dict"), dict) and "peers" not in contents


@dataclass
class TeacherParts:
    peer: Peer  # built for the checkpoint's backbone and head, weights not loaded yet
    backbone: dict[str, torch.Tensor]  # the state_dicts that load into peer.backbone and peer.head
    head: dict[str, torch.Tensor]
    source: str


def teacher_parts(contents: dict, path: Path, t: TeacherConfig, image_size: int) -> TeacherParts:
    """The peer a Lightning checkpoint's backbone and projection head make, and the state_dicts to load into it."""
    weights = {k: v for k, v in contents["state_dict"].items() if isinstance(v, torch.Tensor)}
    layout = _layout(weights, path)
    if t.peer:
        raise ConfigError(f"teacher.peer: {path} is a {layout.library} checkpoint of one network; leave teacher.peer "
                          f"empty")
    if not t.arch:
        raise ConfigError(f"teacher.arch: {path} is a {layout.library} checkpoint, which does not record its "
                          f"backbone's architecture; name it, e.g. teacher.arch=resnet18")
    backbone_prefix = next(p for p in layout.backbones if any(k.startswith(p) for k in weights))
    backbone = _under(weights, backbone_prefix)
    spec = BACKBONES.get(t.arch, "teacher.arch")
    # a 3x3 first conv is the library's CIFAR ResNet (an ImageNet one is 7x7)
    conv1 = backbone.get("conv1.weight", backbone.get("0.weight"))
    cifar_stem = t.cifar_stem or (spec.cifar_stem and conv1 is not None and conv1.dim() == 4 and conv1.shape[-1] == 3)
    head_state = _under(weights, layout.projector)
    beyond = sorted({k for k in _under(weights, layout.head) if not (layout.head + k).startswith(layout.projector)})
    if beyond:
        raise ConfigError(f"teacher.checkpoint: {path}'s {layout.head.rstrip('.')} holds more than its layers "
                          f"({', '.join(beyond[:3])}): a DINO-style head with prototypes, which dogo does not read as "
                          f"a teacher's embedding")
    head = mirrored_head(head_state, f"{path}'s {layout.projector.rstrip('.')}", t.head_activation)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    peer = Peer(t.arch, cifar_stem, linears[0].out_features, _width(head), image_size=image_size,
                arch_args=t.arch_args, head=head)  # the library's own head: the teacher computes what it computed
    if linears[0].in_features != peer.num_features:
        raise ConfigError(f"teacher.arch: {path}'s projection head takes {linears[0].in_features} features; "
                          f"{t.arch} gives {peer.num_features}: name the backbone the run trained")
    if cifar_stem and hasattr(peer.backbone, "conv1"):
        peer.backbone.conv1.padding = (layout.cifar_padding, layout.cifar_padding)
    backbone = _by_child_names(backbone, peer.backbone, path)
    classifier = spec.classifier_keys()
    backbone = {k: v for k, v in backbone.items() if not k.startswith(classifier)}
    stem = f", CIFAR stem with padding {layout.cifar_padding}" if cifar_stem else ""
    return TeacherParts(peer, backbone, head_state, f"{layout.library} checkpoint {path} ({t.arch}{stem})")


def _layout(weights: dict, path: Path) -> Layout:
    for layout in LAYOUTS:
        if any(k.startswith(layout.projector) for k in weights) and \
                any(k.startswith(p) for p in layout.backbones for k in weights):
            return layout
    top = sorted({k.split(".")[0] for k in weights})
    raise ConfigError(f"teacher.checkpoint: {path} holds a state_dict of neither known layout (its modules: "
                      f"{', '.join(top[:8])}); dogo reads solo-learn's (backbone + projector) and lightly's (backbone "
                      f"+ projection_head); for another, save the backbone's and head's state_dicts and give them as "
                      f"teacher.backbone and teacher.head")


def _under(weights: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _by_child_names(state: dict, backbone: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """lightly's nn.Sequential(*list(resnet.children())[:-1]) numbers the model's children: name them again."""
    if not all(k.split(".")[0].isdigit() for k in state):
        return state
    children = list(backbone.named_children())
    renamed = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        i = int(index)
        if i >= len(children) or not any(True for _ in children[i][1].state_dict()):
            raise ConfigError(f"teacher.arch: {path}'s backbone has weights at child {index}, where "
                              f"{type(backbone).__name__} has " + (f"its {children[i][0]}" if i < len(children) else
                                                                  f"{len(children)} children") +
                              ": it is not a torchvision-layout backbone of that name (lightly's own ResNetGenerator "
                              "is not read); name the backbone the run trained")
        renamed[f"{children[i][0]}.{rest}"] = value
    return renamed


def mirrored_head(state: dict[str, torch.Tensor], what: str, activation: str = "relu") -> nn.Sequential:
    """The nn.Sequential of Linear, BatchNorm1d and activation (relu or gelu) layers whose state_dict `state` is."""
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        index, _, name = key.partition(".")
        if not index.isdigit():
            raise ConfigError(f"teacher.checkpoint: {what} is not an nn.Sequential (it has {key})")
        by_index.setdefault(int(index), {})[name] = value
    if not by_index:
        raise ConfigError(f"teacher.checkpoint: {what} holds no layers")
    layers: list[nn.Module] = []
    for i in range(max(by_index) + 1):
        layers.append(_layer(by_index.get(i), f"{what} layer {i}", activation))
    if not isinstance(layers[0], nn.Linear):
        raise ConfigError(f"teacher.checkpoint: {what} does not start with a Linear layer")
    return nn.Sequential(*layers)


_BATCHNORM = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def _layer(tensors: dict[str, torch.Tensor] | None, what: str, activation: str) -> nn.Module:
    if tensors is None:  # no tensors: the activation
        return nn.GELU() if activation == "gelu" else nn.ReLU()
    if "running_mean" in tensors and set(tensors) <= _BATCHNORM:
        return nn.BatchNorm1d(tensors["running_mean"].shape[0], affine="weight" in tensors)
    weight = tensors.get("weight")
    if weight is not None and weight.dim() == 2 and set(tensors) <= {"weight", "bias"}:
        out_features, in_features = weight.shape
        return nn.Linear(in_features, out_features, bias="bias" in tensors)
    raise ConfigError(f"teacher.checkpoint: {what} ({', '.join(sorted(tensors))}) is neither a Linear nor a "
                      f"BatchNorm1d: dogo rebuilds heads of Linear, BatchNorm1d and activation layers")


def _width(head: nn.Sequential) -> int:
    last = head[-1]
    return last.out_features if isinstance(last, nn.Linear) else last.num_features

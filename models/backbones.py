"""Backbones looked up by name (BACKBONES), each with the contract every part of dogo relies on, so that the heads,
the memory estimate, the DisCo teacher loader and `dogo export` need no architecture-specific branch.

A backbone maps images (N, 3, H, W) to pooled penultimate features (N, num_features). Its state_dict keys are its
library's (torchvision's), minus the classifier, so an exported backbone loads into the library's model once the
classifier is replaced by an identity (see `export_hint`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn
import torchvision.models as tvm

from dogo.engine.errors import ConfigError, Registry


@dataclass(frozen=True)
class Backbone:
    """What a registered backbone promises."""
    factory: Callable[[bool, bool], tuple[nn.Module, int]]  # (cifar_stem, zero_init_residual) -> (module, width)
    classifier: str  # the attribute holding the library model's classifier (replaced by an identity here)
    library_model: str  # the library's constructor an exported backbone loads into, e.g. torchvision.models.resnet18
    zero_init_residual: bool = False  # has residual blocks whose last BN can start at zero scale
    channels_last: bool = True  # convolutions that run faster on channels_last images on GPUs

    def classifier_keys(self) -> tuple[str, ...]:
        """Prefixes of a full library model's state_dict that are the classifier (dropped when loading one)."""
        return (self.classifier + ".",)

    def export_hint(self, path: str) -> str:
        return (f"m = {self.library_model}(); m.{self.classifier} = torch.nn.Identity(); "
                f"m.load_state_dict(torch.load('{path}'), strict=True)")


BACKBONES: Registry[Backbone] = Registry("backbone")


def register_backbone(name: str, backbone: Backbone) -> Backbone:
    return BACKBONES.register(name, backbone)


def build_backbone(name: str, cifar_stem: bool = False, zero_init_residual: bool = False,
                   key: str = "arch") -> tuple[nn.Module, int]:
    """(module, num_features) of the registered backbone `name` (`key`: the config key naming it, for errors)."""
    spec = BACKBONES.get(name, key)
    if zero_init_residual and not spec.zero_init_residual:
        raise ConfigError(f"{key}: the {name} backbone has no residual blocks for zero_init_residual")
    return spec.factory(cifar_stem, zero_init_residual)


def _resnet(ctor) -> Callable[[bool, bool], tuple[nn.Module, int]]:
    def factory(cifar_stem: bool, zero_init_residual: bool) -> tuple[nn.Module, int]:
        # zero_init_residual: the last BN of each block starts at zero scale (SimCLR's ResNet does so), so every
        # block starts as the identity and deep ResNets begin learning as fast as shallow ones.
        net = ctor(weights=None, zero_init_residual=zero_init_residual)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        if cifar_stem:
            # Small images lose too much to a 7x7/2 conv and a max-pool: keep full resolution into layer1.
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        return net, dim
    return factory


def _classifier_net(ctor, dim_of: Callable[[nn.Module], int]) -> Callable[[bool, bool], tuple[nn.Module, int]]:
    """EfficientNet and MobileNet: features -> pool -> classifier; the first conv is features[0][0]."""
    def factory(cifar_stem: bool, zero_init_residual: bool) -> tuple[nn.Module, int]:
        net = ctor(weights=None)
        dim = dim_of(net)
        net.classifier = nn.Identity()
        if cifar_stem:
            net.features[0][0].stride = (1, 1)
        return net, dim
    return factory


for _name, _ctor in [("resnet18", tvm.resnet18), ("resnet34", tvm.resnet34),
                     ("resnet50", tvm.resnet50), ("resnet101", tvm.resnet101)]:
    register_backbone(_name, Backbone(_resnet(_ctor), classifier="fc", library_model=f"torchvision.models.{_name}",
                                      zero_init_residual=True))

# EfficientNet's classifier is Dropout-Linear; MobileNetV3's is Linear-Hardswish-Dropout-Linear: the pooled
# features are what enters the first Linear.
register_backbone("efficientnet_b0", Backbone(
    _classifier_net(tvm.efficientnet_b0, lambda n: n.classifier[1].in_features), classifier="classifier",
    library_model="torchvision.models.efficientnet_b0"))
register_backbone("mobilenet_v3_large", Backbone(
    _classifier_net(tvm.mobilenet_v3_large, lambda n: n.classifier[0].in_features), classifier="classifier",
    library_model="torchvision.models.mobilenet_v3_large"))

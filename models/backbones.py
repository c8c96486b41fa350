"""Backbones looked up by name: torchvision architectures with their classifier removed.

A backbone maps images (N, 3, H, W) to pooled penultimate features (N, feature_dim). Its state_dict keys are
torchvision's, minus the classifier, so an exported backbone loads into `torchvision.models.<arch>()` once the
classifier is replaced by `nn.Identity()` (see `dogo export`).
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn
import torchvision.models as tvm

# name -> factory(cifar_stem, zero_init_residual) -> (module, feature_dim)
BACKBONES: dict[str, Callable[[bool, bool], tuple[nn.Module, int]]] = {}


def register_backbone(name: str):
    def wrap(factory):
        if name in BACKBONES:
            raise ValueError(f"backbone '{name}' is registered twice")
        BACKBONES[name] = factory
        return factory
    return wrap


def build_backbone(name: str, cifar_stem: bool = False, zero_init_residual: bool = False
                   ) -> tuple[nn.Module, int]:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; registered: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](cifar_stem, zero_init_residual)


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
        if zero_init_residual:
            raise ValueError("zero_init_residual applies to ResNets only")
        net = ctor(weights=None)
        dim = dim_of(net)
        net.classifier = nn.Identity()
        if cifar_stem:
            net.features[0][0].stride = (1, 1)
        return net, dim
    return factory


for _name, _ctor in [("resnet18", tvm.resnet18), ("resnet34", tvm.resnet34),
                     ("resnet50", tvm.resnet50), ("resnet101", tvm.resnet101)]:
    register_backbone(_name)(_resnet(_ctor))

# EfficientNet's classifier is Dropout-Linear; MobileNetV3's is Linear-Hardswish-Dropout-Linear: the pooled
# features are what enters the first Linear.
register_backbone("efficientnet_b0")(_classifier_net(tvm.efficientnet_b0, lambda n: n.classifier[1].in_features))
register_backbone("mobilenet_v3_large")(_classifier_net(tvm.mobilenet_v3_large, lambda n: n.classifier[0].in_features))

"""Backbones by name, each with the contract every part of dogo relies on, so that the heads, the memory estimate,
the optimiser's groups, the DisCo teacher loader and `dogo export` need no architecture-specific branch.

Two kinds of names: the registered ones (BACKBONES: torchvision's resnet18, ..., and the CIFAR ResNets resnet20 to
resnet110, which no library ships and dogo builds itself), and `timm:<name>` for any model of the timm library (the
timm extra), created with `num_classes=0`, the view size where the model takes one (ViTs, Swin) and the peer's
`arch_args` (e.g. a ViT's patch_size). A backbone maps images (N, 3, H, W) to pooled features (N, num_features). Its
state_dict keys are its library's, minus the classifier, so an exported backbone loads into the library's model
without its classifier (see `Backbone.load_lines`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.models.resnet import BasicBlock

from dogo.core.errors import ConfigError, close_names
from dogo.core.registry import BACKBONES

TIMM = "timm:"
# timm's transformer families: their one convolution (the patch embedding) gains nothing from channels_last
_TRANSFORMER_MODULES = ("vision_transformer", "deit", "beit", "eva", "cait", "xcit", "swin_transformer", "levit")


@dataclass(frozen=True)
class Backbone:
    """What a backbone promises."""
    # (cifar_stem, zero_init_residual, image_size, arch_args) -> (module, num_features)
    factory: Callable[[bool, bool, int, dict], tuple[nn.Module, int]]
    classifier: str  # the library model's classifier: absent here, its keys dropped from a library state_dict
    library: str  # "torchvision", "timm" or "dogo" (no library has it): what an exported backbone loads into
    library_model: str  # the constructor that builds the same model with its classifier (dogo's: the whole call)
    timm_name: str | None = None  # a timm model with the same state_dict keys (torchvision ResNets: timm's ResNets)
    zero_init_residual: bool = False  # has residual blocks whose last BN can start at zero scale
    cifar_stem: bool = False  # takes dogo's CIFAR stem (3x3 stride-1 first conv, no max-pool)
    channels_last: bool = True  # convolutions that run faster on channels_last images on GPUs
    sized: bool = False  # built for the view size (timm's transformers take img_size)
    # the CIFAR stem (when cifar_stem), as plain torch statements on the library's model `m`: what export prints
    cifar_stem_code: str = ""

    def classifier_keys(self) -> tuple[str, ...]:
        """Prefixes of a full library model's state_dict that are the classifier (dropped when loading one)."""
        return (self.classifier + ".",)

    @staticmethod
    def no_weight_decay(module: nn.Module) -> set[str]:
        """Parameter names that take no weight decay beyond biases and norms: timm's own list (a ViT's position
        embedding and class token)."""
        names = getattr(module, "no_weight_decay", None)
        return set(names()) if callable(names) else set()

    def load_lines(self, path: str, image_size: int, arch_args: dict, library: str | None = None,
                   cifar_stem: bool = False) -> list[str]:
        """Python statements that load an exported backbone with `library` (default: its own) alone, one per line
        (each line runs as pasted): the library's model, dogo's CIFAR stem rebuilt if it was trained with it, no
        classifier, then the weights, strictly. dogo's own CIFAR ResNets (library dogo) load with dogo's
        constructor: no library ships them."""
        if (library or self.library) == "timm":
            name = self.library_model if self.library == "timm" else self.timm_name
            extra = "".join(f", {k}={v!r}" for k, v in arch_args.items())
            size = f", img_size={image_size}" if self.sized else ""
            return ["import timm, torch", f"m = timm.create_model('{name}', num_classes=0{size}{extra})",
                    f"m.load_state_dict(torch.load('{path}'), strict=True)"]
        constructor = self.library_model if self.library_model.endswith(")") else f"{self.library_model}()"
        module = self.library_model.split("(")[0].rpartition(".")[0]  # torchvision.models, dogo.models.backbones
        return [f"import torch, {module}", f"m = {constructor}",
                *([self.cifar_stem_code] if cifar_stem else []), f"m.{self.classifier} = torch.nn.Identity()",
                f"m.load_state_dict(torch.load('{path}'), strict=True)"]


def build_backbone(name: str, cifar_stem: bool = False, zero_init_residual: bool = False, key: str = "arch",
                   image_size: int = 224, arch_args: dict | None = None) -> tuple[nn.Module, int]:
    """(module, num_features) of backbone `name` (`key`: the config key naming it, for errors)."""
    spec = BACKBONES.get(name, key)
    if zero_init_residual and not spec.zero_init_residual:
        raise ConfigError(f"{key}: the {name} backbone has no residual blocks for zero_init_residual")
    if cifar_stem and not spec.cifar_stem:
        raise ConfigError(f"{key}: cifar_stem applies to the torchvision ResNets, EfficientNet and MobileNet, not to "
                          f"{name} (the CIFAR ResNets are built for small images already: set it to false; give a "
                          f"timm model its own arguments instead: arch_args, e.g. a ViT's patch_size)")
    if arch_args and spec.library != "timm":
        raise ConfigError(f"{key}: arch_args are passed to timm.create_model; {name} is a {spec.library} backbone")
    return spec.factory(cifar_stem, zero_init_residual, image_size, dict(arch_args or {}))


@functools.lru_cache(maxsize=None)
def _timm_spec(name: str, key: str) -> Backbone:
    try:
        import timm
        from timm.models import get_pretrained_cfg, model_entrypoint
    except ImportError:
        raise ConfigError(f"{key}: timm:{name} needs the timm package: the timm extra (make setup, or "
                          f"pip install -e '.[timm]')") from None
    if not timm.is_model(name):
        near = close_names(name, timm.list_models(), n=3, cutoff=0.5)
        raise ConfigError(f"{key}: {name!r} is not a timm model" + (f"; did you mean {', '.join(near)}?" if near
                          else "; timm.list_models('pattern*') lists them"))
    cfg = get_pretrained_cfg(name)
    module = model_entrypoint(name).__module__.rsplit(".", 1)[-1]

    def factory(cifar_stem: bool, zero_init_residual: bool, image_size: int, arch_args: dict):
        kwargs = {**arch_args, "num_classes": 0}
        try:
            net = timm.create_model(name, img_size=image_size, **kwargs)  # ViTs, Swin: built for the view size
        except TypeError:
            try:
                net = timm.create_model(name, **kwargs)  # a model without an input size (a CNN)
            except TypeError as exc:
                raise ConfigError(f"{key}: timm.create_model('{name}') does not take arch_args {arch_args}: "
                                  f"{exc}") from None
        return net, net.num_features

    transformer = module in _TRANSFORMER_MODULES
    return Backbone(factory, classifier=(cfg.classifier if cfg and cfg.classifier else "head"), library="timm",
                    library_model=name, channels_last=not transformer, sized=transformer)


BACKBONES.register_family(TIMM, _timm_spec)


def _resnet(ctor) -> Callable[[bool, bool, int, dict], tuple[nn.Module, int]]:
    def factory(cifar_stem: bool, zero_init_residual: bool, image_size: int, arch_args: dict) -> tuple[nn.Module, int]:
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


# the stems of _resnet and _classifier_net as plain torch statements (Backbone.cifar_stem_code)
_RESNET_CIFAR_STEM = ("m.conv1 = torch.nn.Conv2d(3, m.conv1.out_channels, kernel_size=3, stride=1, padding=1, "
                      "bias=False); m.maxpool = torch.nn.Identity()")
_FEATURES_CIFAR_STEM = "m.features[0][0].stride = (1, 1)"


def _classifier_net(ctor, dim_of: Callable[[nn.Module], int]) -> Callable[[bool, bool, int, dict], tuple[nn.Module, int]]:
    """EfficientNet and MobileNet: features -> pool -> classifier; the first conv is features[0][0]."""
    def factory(cifar_stem: bool, zero_init_residual: bool, image_size: int, arch_args: dict) -> tuple[nn.Module, int]:
        net = ctor(weights=None)
        dim = dim_of(net)
        net.classifier = nn.Identity()
        if cifar_stem:
            net.features[0][0].stride = (1, 1)
        return net, dim
    return factory


for _name, _ctor in [("resnet18", tvm.resnet18), ("resnet34", tvm.resnet34),
                     ("resnet50", tvm.resnet50), ("resnet101", tvm.resnet101)]:
    BACKBONES.register(_name, Backbone(_resnet(_ctor), classifier="fc", library="torchvision",
                                      library_model=f"torchvision.models.{_name}", timm_name=_name,
                                      zero_init_residual=True, cifar_stem=True, cifar_stem_code=_RESNET_CIFAR_STEM))

# EfficientNet's classifier is Dropout-Linear; MobileNetV3's is Linear-Hardswish-Dropout-Linear: the pooled
# features are what enters the first Linear.
BACKBONES.register("efficientnet_b0", Backbone(
    _classifier_net(tvm.efficientnet_b0, lambda n: n.classifier[1].in_features), classifier="classifier",
    library="torchvision", library_model="torchvision.models.efficientnet_b0", cifar_stem=True,
    cifar_stem_code=_FEATURES_CIFAR_STEM))
BACKBONES.register("mobilenet_v3_large", Backbone(
    _classifier_net(tvm.mobilenet_v3_large, lambda n: n.classifier[0].in_features), classifier="classifier",
    library="torchvision", library_model="torchvision.models.mobilenet_v3_large", cifar_stem=True,
    cifar_stem_code=_FEATURES_CIFAR_STEM))


class CifarResNet(nn.Module):
    """He et al. 2016's ResNets for CIFAR (section 4.2; the students and teachers of the distillation literature):
    a 3x3 convolution of 16 channels, three stages of n basic blocks of 16, 32 and 64 channels (the second and third
    halve the resolution), global average pooling, the classifier: 6n + 2 layers. A shortcut that changes shape is
    a 1x1 convolution with BN (option B, as in torchvision's ResNets and CRD's code; the paper pads with zeros).
    Built from torchvision's BasicBlock under torchvision's module names (conv1, bn1, layer1-3, fc), so that its
    state_dict reads as a torchvision ResNet's without layer4."""

    def __init__(self, depth: int, num_classes: int = 10, zero_init_residual: bool = False):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has 6n + 2 layers, not {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, blocks, stride=1)
        self.layer2 = self._stage(16, 32, blocks, stride=2)
        self.layer3 = self._stage(32, 64, blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    @staticmethod
    def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or inplanes != planes:
            down = nn.Sequential(nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                 nn.BatchNorm2d(planes))
        return nn.Sequential(BasicBlock(inplanes, planes, stride, down),
                             *(BasicBlock(planes, planes) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """The whole CIFAR ResNet of `depth` layers (20, 32, 44, 56, 110), with its classifier."""
    return CifarResNet(depth, num_classes)


def _cifar_resnet(depth: int) -> Callable[[bool, bool, int, dict], tuple[nn.Module, int]]:
    def factory(cifar_stem: bool, zero_init_residual: bool, image_size: int, arch_args: dict) -> tuple[nn.Module, int]:
        net = CifarResNet(depth, zero_init_residual=zero_init_residual)
        net.fc = nn.Identity()
        return net, 64
    return factory


# Built for 32 px already (their first convolution is 3x3 with stride 1, no max-pool): cifar_stem does not apply.
for _depth in (20, 32, 44, 56, 110):
    BACKBONES.register(f"resnet{_depth}", Backbone(_cifar_resnet(_depth), classifier="fc", library="dogo",
                                                  library_model=f"dogo.models.backbones.cifar_resnet({_depth})",
                                                  zero_init_residual=True))

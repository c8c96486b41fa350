"""Every registered backbone: forward shape, finite output, a gradient for every parameter (timm's model tests)."""
import pytest
import torch

from dogo.core.registry import BACKBONES
from dogo.models import Peer, build_backbone


@pytest.mark.parametrize("cifar_stem", [False, True])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_forward_backward(name, cifar_stem):
    torch.manual_seed(0)
    net, dim = build_backbone(name, cifar_stem, zero_init_residual=name.startswith("resnet") and cifar_stem)
    x = torch.randn(2, 3, 32, 32)
    feats = net(x)
    assert feats.shape == (2, dim)
    assert torch.isfinite(feats).all()
    feats.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"


def test_peer_head_shapes():
    peer = Peer("resnet18", True, head_hidden=64, head_out=16)
    z = peer(torch.randn(4, 3, 16, 16))
    assert z.shape == (4, 16)
    layers = [type(m).__name__ for m in peer.head]
    assert layers == ["Linear", "BatchNorm1d", "ReLU", "Linear"]


def test_unknown_backbone_names_the_registry():
    with pytest.raises(ValueError, match="resnet18"):
        build_backbone("resnet19")

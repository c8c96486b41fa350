"""Every registered backbone: forward shape, finite output, a gradient for every parameter (timm's model tests)."""
import pytest
import torch

from dogo.core.errors import ConfigError
from dogo.core.registry import BACKBONES
from dogo.models import Peer, build_backbone


@pytest.mark.parametrize("cifar_stem", [False, True])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_forward_backward(name, cifar_stem):
    torch.manual_seed(0)
    spec = BACKBONES.get(name, "arch")
    if cifar_stem and not spec.cifar_stem:
        with pytest.raises(ConfigError, match=f"cifar_stem applies to .* not to {name}"):
            build_backbone(name, cifar_stem)
        return
    net, dim = build_backbone(name, cifar_stem, zero_init_residual=spec.zero_init_residual and cifar_stem)
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


@pytest.mark.parametrize("depth, paper_params", [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6),
                                                 (110, 1.7e6)])
def test_cifar_resnets_are_he_et_als(depth, paper_params):
    """6n + 2 layers: n basic blocks per stage of 16, 32, 64 channels at 32, 16, 8 px; the parameters of the paper's
    Table 6 (its zero-padding shortcuts have none; our two 1x1 projections add 2,560 and their BN 192)."""
    net, dim = build_backbone(f"resnet{depth}")
    n = (depth - 2) // 6
    assert dim == 64 and [len(getattr(net, f"layer{i}")) for i in (1, 2, 3)] == [n, n, n]
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == depth - 1  # and the classifier: depth weighted layers
    x, shapes = torch.relu(net.bn1(net.conv1(torch.randn(1, 3, 32, 32)))), []
    for stage in (net.layer1, net.layer2, net.layer3):
        x = stage(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    params = sum(p.numel() for p in net.parameters())
    assert params == pytest.approx(paper_params + 16 * 32 + 32 * 64 + 2 * (32 + 64), rel=0.02)
    zero, _ = build_backbone(f"resnet{depth}", zero_init_residual=True)
    assert all(b.bn2.weight.abs().sum() == 0 for stage in (zero.layer1, zero.layer2, zero.layer3) for b in stage)


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_the_export_line_of_a_cifar_resnet_loads_its_state_dict(name, tmp_path):
    """What `dogo export` prints for a backbone no library has: run as printed, it loads the exported keys strictly
    and gives the same features."""
    net, _ = build_backbone(name)
    net.eval()
    path = tmp_path / "b.pt"
    torch.save(net.state_dict(), path)
    spec = BACKBONES.get(name, "arch")
    scope = {}
    for line in spec.load_lines(str(path), 32, {}):
        exec(line, scope)  # noqa: S102 - the lines dogo export prints
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(scope["m"].eval()(x), net(x))

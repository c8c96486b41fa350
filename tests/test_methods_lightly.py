"""BYOL, VICReg and Barlow Twins against a reference no one here wrote: the lightly package's losses, in loss and in
gradient, on fresh random float64 inputs; and BYOL's momentum update against its formula."""
import math

import pytest
import torch

from dogo.engine.config import ObjectiveConfig, PeerConfig
from dogo.engine.ssl.objectives import objective_loss
from dogo.engine.ssl.peers import Crops

lightly_loss = pytest.importorskip("lightly.loss", reason="lightly is a test dependency (the dev extra)")


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5).requires_grad_()


def _loss(method, outputs, targets=None, **settings):
    peer = PeerConfig(ssl=method)
    for key, value in settings.items():
        setattr(getattr(peer, method), key, value)
    from dogo.engine.ssl.targets import Targets
    t = Targets(method={"p": targets}) if targets is not None else None
    crops = Crops.of(outputs[:2], outputs[2:] or None)  # (z1, z2) and a method's (p1, p2)
    return objective_loss({"p": crops}, ObjectiveConfig(name=method, tile=1024), {"p": peer}, t)[0]


def _same(ours, theirs, leaves):
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    g_ours = torch.autograd.grad(ours, leaves, retain_graph=True)
    g_theirs = torch.autograd.grad(theirs, leaves, retain_graph=True)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_byol_loss_equals_lightlys_negative_cosine_similarity(seed):
    """BYOL's loss is 2 - 2 cos per direction, both summed: with lightly's NegativeCosineSimilarity (-cos) that is
    4 + 2 (ncs(p1, t2) + ncs(p2, t1)), the targets without gradient."""
    b, d = 7, 5
    z1, z2, p1, p2 = (_rand(b, d, seed=10 * seed + i) for i in range(4))
    t1, t2 = (torch.nn.functional.normalize(_rand(b, d, seed=10 * seed + 4 + i), dim=1).detach() for i in range(2))
    ncs = lightly_loss.NegativeCosineSimilarity()
    theirs = 4 + 2 * (ncs(p1, t2) + ncs(p2, t1))
    _same(_loss("byol", (z1, z2, p1, p2), (t1, t2)), theirs, (p1, p2))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("coeffs", [(25.0, 25.0, 1.0), (5.0, 2.0, 0.5)])
def test_vicreg_loss_equals_lightlys(seed, coeffs):
    b, d = 9, 6
    z1, z2 = _rand(b, d, seed=seed), _rand(b, d, seed=seed + 100) * 0.3  # some dimensions below the std hinge
    sim, std, cov = coeffs
    theirs = lightly_loss.VICRegLoss(lambda_param=sim, mu_param=std, nu_param=cov, eps=1e-4)(z1, z2)
    ours = _loss("vicreg", (z1, z2), sim_coeff=sim, std_coeff=std, cov_coeff=cov, eps=1e-4)
    _same(ours, theirs, (z1, z2))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lambd", [0.0051, 0.2])
def test_barlow_twins_loss_equals_lightlys(seed, lambd):
    b, d = 8, 6
    z1, z2 = _rand(b, d, seed=seed), _rand(b, d, seed=seed + 50)
    theirs = lightly_loss.BarlowTwinsLoss(lambda_param=lambd)(z1, z2)
    _same(_loss("barlowtwins", (z1, z2), lambd=lambd), theirs, (z1, z2))


def test_byol_target_network_follows_byols_formula():
    """BYOL: xi <- tau xi + (1 - tau) theta, with tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2."""
    from dogo.engine.config import PeerConfig, resolve
    from dogo.core.registry import METHODS
    from dogo.engine.ssl.peers import build_peer
    from dogo.engine import config as config_mod
    cfg = config_mod.Config(objective=ObjectiveConfig(name="byol"),
                            peers={"p": PeerConfig(arch="resnet18", cifar_stem=True, head_hidden=16, head_out=8)})
    resolve(cfg)
    peer_cfg = cfg.peers["p"]
    torch.manual_seed(0)
    peer = build_peer(peer_cfg)
    state = METHODS.get("byol", "ssl").make_state(peer_cfg, peer, seed=0)
    target = state.target.encoder
    assert target.predictor is None and all(not p.requires_grad for p in target.parameters())
    online = dict(peer.named_parameters())
    assert all(torch.equal(p, online[n]) for n, p in target.named_parameters())  # starts as a copy
    before = {n: p.detach().double().clone() for n, p in target.named_parameters()}
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(torch.randn_like(p))
    step, total, base = 30, 100, peer_cfg.byol.momentum
    tau = 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2
    state.schedule(step, total, total)
    state.after_step(peer, None)
    for n, p in target.named_parameters():
        torch.testing.assert_close(p.double(), tau * before[n] + (1 - tau) * online[n].double(), rtol=1e-6, atol=1e-7)

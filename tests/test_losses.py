"""The objectives' losses against straightforward float64 references, including their gradients."""
import math

import pytest
import torch

from dogo.engine.config import ObjectiveConfig, PeerConfig
from dogo.engine.ssl.objectives import objective_loss
from dogo.engine.ssl.peers import Crops


def ntxent_reference(z1, z2, tau):
    """Row by row, as written in docs/algorithms.md."""
    z1 = z1 / z1.norm(dim=1, keepdim=True)
    z2 = z2 / z2.norm(dim=1, keepdim=True)
    z = torch.cat([z1, z2])
    n, b = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        p = (i + b) % n
        s = [z[i] @ z[j] / tau for j in range(n) if j != i]
        total = total + (-(z[i] @ z[p]) / tau + torch.logsumexp(torch.stack(s), 0))
    return total / n


def kl_reference(z1, z2, peer1, peer2, tau_kl):
    """KL(P_peer || P_self), P = row softmax of view-1 against view-2 similarities, per-row mean."""
    def probs(a, b):
        a = a / a.norm(dim=1, keepdim=True)
        b = b / b.norm(dim=1, keepdim=True)
        return torch.softmax(a @ b.T / tau_kl, dim=1)
    p_self = probs(z1, z2)
    p_peer = probs(peer1, peer2).detach()
    return (p_peer * (p_peer.log() - p_self.log())).sum(1).mean()


def _inputs(b, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(4)]


@pytest.mark.parametrize("b,d,tau", [(4, 8, 0.5), (9, 16, 0.1), (16, 3, 1.0)])
def test_simclr_matches_reference(b, d, tau):
    z1, z2, _, _ = _inputs(b, d, seed=b * 31 + d)
    loss, terms = objective_loss({"p": Crops.of([z1, z2])}, ObjectiveConfig(name="simclr", tile=1024), {"p": PeerConfig(ssl="simclr", tau=tau)})
    ref = ntxent_reference(z1, z2, tau)
    # the engine normalises in float32 whatever the input dtype, hence float32 tolerances
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
    g = torch.autograd.grad(loss, (z1, z2))
    g_ref = torch.autograd.grad(ref, (z1, z2))
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("b,tau_kl,w", [(5, 0.1, 1.0), (12, 0.5, 0.3)])
def test_dogo_matches_reference_and_kl_grad_goes_to_own_peer(b, tau_kl, w):
    a1, a2, b1, b2 = _inputs(b, 8, seed=b)
    peers = {"a": PeerConfig(ssl="simclr", tau=0.2, kl_weight=w), "b": PeerConfig(ssl="simclr", tau=0.3, kl_weight=2 * w)}
    obj = ObjectiveConfig(name="dogo", tau_kl=tau_kl, tile=1024)
    loss, terms = objective_loss({"a": Crops.of([a1, a2]), "b": Crops.of([b1, b2])}, obj, peers)
    kl_a = kl_reference(a1, a2, b1, b2, tau_kl)
    kl_b = kl_reference(b1, b2, a1, a2, tau_kl)
    ref = (ntxent_reference(a1, a2, 0.2) + w * kl_a + ntxent_reference(b1, b2, 0.3) + 2 * w * kl_b)
    assert math.isclose(terms["a/kl"].item(), kl_a.item(), rel_tol=1e-4, abs_tol=1e-7)
    assert math.isclose(terms["b/kl"].item(), kl_b.item(), rel_tol=1e-4, abs_tol=1e-7)
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
    grads = torch.autograd.grad(loss, (a1, a2, b1, b2))
    ref_grads = torch.autograd.grad(ref, (a1, a2, b1, b2))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)


def test_kl_term_sends_gradient_to_its_own_peer_only():
    a1, a2, b1, b2 = _inputs(6, 8, seed=7)
    # Only peer a's KL term is on: the total is NT-Xent(a) + NT-Xent(b) + KL(P_b || P_a).
    peers = {"a": PeerConfig(ssl="simclr", tau=0.5, kl_weight=1.0), "b": PeerConfig(ssl="simclr", tau=0.5, kl_weight=0.0)}
    loss, _ = objective_loss({"a": Crops.of([a1, a2]), "b": Crops.of([b1, b2])}, ObjectiveConfig(name="dogo", tile=1024), peers)
    grads = torch.autograd.grad(loss, (a1, a2, b1, b2))
    only_a = torch.autograd.grad(ntxent_reference(a1, a2, 0.5), (a1, a2))
    only_b = torch.autograd.grad(ntxent_reference(b1, b2, 0.5), (b1, b2))
    # peer a's gradient includes its KL term ...
    assert any((g.double() - r).abs().max() > 1e-3 for g, r in zip(grads[:2], only_a))
    # ... while peer b's equals its NT-Xent gradient alone: a's KL sent it nothing
    for g, r in zip(grads[2:], only_b):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)


def test_bf16_embeddings_are_accumulated_in_float32():
    a1, a2, _, _ = _inputs(8, 16, seed=3, dtype=torch.float32)
    peers = {"p": PeerConfig(ssl="simclr", tau=0.1)}
    full, _ = objective_loss({"p": Crops.of([a1, a2])}, ObjectiveConfig(name="simclr", tile=1024), peers)
    half, _ = objective_loss({"p": Crops.of([a1.bfloat16(), a2.bfloat16()])}, ObjectiveConfig(name="simclr", tile=1024), peers)
    assert half.dtype == torch.float32
    assert math.isclose(full.item(), half.item(), rel_tol=2e-2)

"""The losses under real gloo process groups equal one process computing the global batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dogo.engine.config import ObjectiveConfig, PeerConfig
from dogo.engine.objectives import objective_loss
from tests.conftest import free_port

PEERS = {"a": PeerConfig(ssl="simclr", tau=0.2, kl_weight=1.0), "b": PeerConfig(ssl="simclr", tau=0.5, kl_weight=0.5)}


def _inputs(global_b: int):
    g = torch.Generator().manual_seed(global_b)
    return [torch.randn(global_b, 8, generator=g, dtype=torch.float64) for _ in range(4)]


def _reference(objective: str, global_b: int):
    leaves = [t.clone().requires_grad_() for t in _inputs(global_b)]
    emb = {"a": (leaves[0], leaves[1]), "b": (leaves[2], leaves[3])}
    loss, terms = objective_loss(emb, ObjectiveConfig(name=objective), PEERS)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _worker(rank: int, world: int, port: int, objective: str, global_b: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = global_b // world
    leaves = [t[rank * b:(rank + 1) * b].clone().requires_grad_() for t in _inputs(global_b)]
    emb = {"a": (leaves[0], leaves[1]), "b": (leaves[2], leaves[3])}
    loss, _ = objective_loss(emb, ObjectiveConfig(name=objective), PEERS)
    loss.backward()
    out[rank] = (loss.detach(), [t.grad for t in leaves])
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("objective", ["simclr", "dogo"])
def test_gloo_ranks_equal_the_global_batch(world, objective):
    global_b = 6 * world
    ref_loss, ref_grads = _reference(objective, global_b)
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(world, free_port(), objective, global_b, out), nprocs=world)
    b = global_b // world
    # the global loss is the mean of the ranks' losses; DDP averages gradients, so a rank's own rows carry
    # world x (its gradient) / world: compare rank gradients x 1/world against the reference's rows
    mean_loss = sum(out[r][0] for r in range(world)) / world
    torch.testing.assert_close(mean_loss.double(), ref_loss.double(), rtol=1e-6, atol=1e-7)
    for r in range(world):
        for got, ref in zip(out[r][1], ref_grads):
            torch.testing.assert_close(got.double() / world, ref[r * b:(r + 1) * b], rtol=1e-5, atol=1e-7)


def _bn_worker(rank: int, world: int, port: int, affine: bool, out):
    from dogo.engine.syncbn import AllReduceBatchNorm
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 2
    w = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    b = 8 // world
    bn = AllReduceBatchNorm(3, affine=affine)
    xr = x[rank * b:(rank + 1) * b].clone().requires_grad_()
    y = bn(xr)
    (y * w[rank * b:(rank + 1) * b]).sum().backward()
    out[rank] = (y.detach(), xr.grad, bn.weight.grad if affine else None, bn.running_var.clone())
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("affine", [True, False])  # False: SimSiam's projector output
def test_cpu_sync_batchnorm_equals_batchnorm_over_the_global_batch(affine):
    x = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 2
    w = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    bn = torch.nn.BatchNorm2d(3, affine=affine)
    xr = x.clone().requires_grad_()
    (bn(xr) * w).sum().backward()
    out = mp.Manager().dict()
    mp.spawn(_bn_worker, args=(2, free_port(), affine, out), nprocs=2)
    y = torch.cat([out[r][0] for r in range(2)])
    reference = torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, training=True).detach()
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([out[r][1] for r in range(2)]), xr.grad, rtol=1e-4, atol=1e-5)
    if affine:  # each rank's weight gradient is its share; DDP sums (averages x world) them
        torch.testing.assert_close(out[0][2] + out[1][2], bn.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0][3], bn.running_var, rtol=1e-5, atol=1e-6)


def _kernel_worker(rank: int, world: int, port: int, tau_kl, global_b: int, tile: int, out):
    from dogo.engine.contrastive import contrastive_terms
    from dogo.engine.losses import reference_terms
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = global_b // world
    taus = (0.2, 0.5)
    result = {}
    for name, fn in (("kernel", lambda z: contrastive_terms(z, taus, tau_kl, tile)),
                     ("straightforward", lambda z: reference_terms(z, taus, tau_kl))):
        leaves = [torch.nn.functional.normalize(t[rank * b:(rank + 1) * b], dim=1).requires_grad_()
                  for t in _inputs(global_b)]
        terms = fn(leaves)
        terms.sum().backward()
        result[name] = (terms.detach(), [t.grad for t in leaves])
    out[rank] = result
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("tau_kl", [None, 0.1])
def test_kernel_ranks_equal_the_global_batch(world, tau_kl):
    """Tiles of 4 images over 5 images per rank: tiles straddle rank boundaries and the self-mask diagonal moves."""
    from dogo.engine.contrastive import contrastive_terms
    global_b = 5 * world
    leaves = [torch.nn.functional.normalize(t, dim=1).requires_grad_() for t in _inputs(global_b)]
    ref = contrastive_terms(leaves, (0.2, 0.5), tau_kl, tile=global_b)
    ref.sum().backward()
    out = mp.Manager().dict()
    mp.spawn(_kernel_worker, args=(world, free_port(), tau_kl, global_b, 4, out), nprocs=world)
    b = global_b // world
    for r in range(world):
        # each rank's own loss and gradients equal the straightforward gather-with-gradient version's
        kern, straight = out[r]["kernel"], out[r]["straightforward"]
        torch.testing.assert_close(kern[0], straight[0], rtol=1e-12, atol=1e-12)
        for a, s in zip(kern[1], straight[1]):
            torch.testing.assert_close(a, s, rtol=1e-10, atol=1e-12)
    # the mean of the ranks' terms is the one-process global batch; rank gradients are world x its share
    mean_terms = sum(out[r]["kernel"][0] for r in range(world)) / world
    torch.testing.assert_close(mean_terms, ref.detach(), rtol=1e-12, atol=1e-12)
    for r in range(world):
        for got, full in zip(out[r]["kernel"][1], leaves):
            torch.testing.assert_close(got / world, full.grad[r * b:(r + 1) * b], rtol=1e-10, atol=1e-12)

"""The losses under real gloo process groups equal one process computing the global batch."""
import os

import pytest
import torch
import torch.distributed as dist

from dogo.engine.config import ObjectiveConfig, PeerConfig
from dogo.engine.ssl.objectives import objective_loss
from dogo.engine.ssl.peers import Crops
from tests.helpers import gloo_ranks

PEERS = {"a": PeerConfig(ssl="simclr", tau=0.2, kl_weight=1.0), "b": PeerConfig(ssl="simclr", tau=0.5, kl_weight=0.5)}


def _inputs(global_b: int):
    g = torch.Generator().manual_seed(global_b)
    return [torch.randn(global_b, 8, generator=g, dtype=torch.float64) for _ in range(4)]


def _reference(objective: str, global_b: int):
    leaves = [t.clone().requires_grad_() for t in _inputs(global_b)]
    emb = {"a": Crops.of(leaves[:2]), "b": Crops.of(leaves[2:])}
    loss, terms = objective_loss(emb, ObjectiveConfig(name=objective, tile=1024), PEERS)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _objective_on_rank(rank: int, world: int, objective: str, global_b: int):
    b = global_b // world
    leaves = [t[rank * b:(rank + 1) * b].clone().requires_grad_() for t in _inputs(global_b)]
    emb = {"a": Crops.of(leaves[:2]), "b": Crops.of(leaves[2:])}
    loss, _ = objective_loss(emb, ObjectiveConfig(name=objective, tile=1024), PEERS)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _bn_on_rank(rank: int, world: int, affine: bool):
    from dogo.engine.dist.syncbn import AllReduceBatchNorm
    x, w = _bn_inputs()
    b = len(x) // world
    bn = AllReduceBatchNorm(3, affine=affine)
    xr = x[rank * b:(rank + 1) * b].clone().requires_grad_()
    y = bn(xr)
    (y * w[rank * b:(rank + 1) * b]).sum().backward()
    return y.detach(), xr.grad, bn.weight.grad if affine else None, bn.running_var.clone()


KERNEL_CASES = {  # crops per image and DoGo's KL pairs: two views, and 2 large + 1 small crop
    2: ((0, 1),), 3: ((0, 1), (0, 2), (1, 2))}


def _crops(global_b: int, crops: int):
    """Each peer's crops of the global batch (float64)."""
    g = torch.Generator().manual_seed(global_b + crops)
    return [torch.randn(global_b, 8, generator=g, dtype=torch.float64) for _ in range(2 * crops)]


def _kernel_on_rank(rank: int, world: int, tau_kl, global_b: int, tile: int, crops: int = 2):
    from dogo.engine.ssl.contrastive import contrastive_terms
    from dogo.engine.ssl.losses import reference_terms
    b = global_b // world
    taus, pairs = (0.2, 0.5), KERNEL_CASES[crops]
    result = {}
    for name, fn in (("kernel", lambda z: contrastive_terms([z[:crops], z[crops:]], taus, tau_kl, pairs, tile)),
                     ("straightforward", lambda z: reference_terms([z[:crops], z[crops:]], taus, tau_kl, pairs))):
        leaves = [torch.nn.functional.normalize(t[rank * b:(rank + 1) * b], dim=1).requires_grad_()
                  for t in _crops(global_b, crops)]
        terms = fn(leaves)
        terms.sum().backward()
        result[name] = (terms.detach(), [t.grad for t in leaves])
    return result


OBJECTIVES = ("simclr", "dogo")
# VICReg and Barlow Twins need statistics over the global batch; BYOL's per-row loss is checked beside them
STATISTICS = ("vicreg", "barlowtwins", "byol")


def _statistics_loss(method: str, z1, z2, targets=None):
    from dogo.engine.ssl.targets import Targets
    peers = {"p": PeerConfig(ssl=method)}
    outputs = Crops.of([z1, z2], [z1 * 1.5, z2 - 0.5] if method == "byol" else None)  # BYOL: predictions too
    t = Targets(method={"p": targets}) if targets is not None else None
    return objective_loss({"p": outputs}, ObjectiveConfig(name=method, tile=1024), peers, t)[0]


def _byol_targets(global_b: int):
    t1, t2 = _inputs(global_b)[2:]
    return torch.nn.functional.normalize(t1, dim=1), torch.nn.functional.normalize(t2, dim=1)


def _statistics_on_rank(rank: int, world: int, method: str, global_b: int):
    b = global_b // world
    z1, z2 = (t[rank * b:(rank + 1) * b].clone().requires_grad_() for t in _inputs(global_b)[:2])
    targets = tuple(t[rank * b:(rank + 1) * b] for t in _byol_targets(global_b)) if method == "byol" else None
    loss = _statistics_loss(method, z1, z2, targets)
    loss.backward()
    return loss.detach(), [z1.grad, z2.grad]
TAUS_KL = (None, 0.1)
AFFINE = (True, False)  # False: SimSiam's projector output


def _worker(rank: int, world: int, port: int, out):
    """Everything one world size checks, in one process group (a spawn costs seconds; the checks milliseconds)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out[rank] = {
        "objective": {o: _objective_on_rank(rank, world, o, 6 * world) for o in OBJECTIVES},
        "statistics": {m: _statistics_on_rank(rank, world, m, 6 * world) for m in STATISTICS},
        # tiles of 4 images over 5 images per rank: tiles straddle rank boundaries and the self-mask diagonal moves
        "kernel": {(t, c): _kernel_on_rank(rank, world, t, 5 * world, 4, c) for t in TAUS_KL for c in KERNEL_CASES},
        "bn": {a: _bn_on_rank(rank, world, a) for a in AFFINE},
    }
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request):
    """(world, what each rank computed) from real gloo processes."""
    world = request.param
    return world, gloo_ranks(_worker, world)


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gloo_ranks_equal_the_global_batch(ranks, objective):
    world, out = ranks
    global_b = 6 * world
    ref_loss, ref_grads = _reference(objective, global_b)
    b = global_b // world
    got = [out[r]["objective"][objective] for r in range(world)]
    # the global loss is the mean of the ranks' losses; DDP averages gradients, so a rank's own rows carry
    # world x (its gradient) / world: compare rank gradients x 1/world against the reference's rows
    mean_loss = sum(got[r][0] for r in range(world)) / world
    torch.testing.assert_close(mean_loss.double(), ref_loss.double(), rtol=1e-6, atol=1e-7)
    for r in range(world):
        for g, ref in zip(got[r][1], ref_grads):
            torch.testing.assert_close(g.double() / world, ref[r * b:(r + 1) * b], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("method", STATISTICS)
def test_vicreg_barlow_twins_and_byol_under_gloo_ranks_equal_the_global_batch(ranks, method):
    """Their variance, covariance and cross-correlation over every rank's embeddings, gathered with the gradient:
    the mean of the ranks' losses is the whole batch's loss and each rank's gradient (before DDP's averaging) is
    world x the whole batch's gradient of its rows."""
    world, out = ranks
    global_b = 6 * world
    z1, z2 = (t.clone().requires_grad_() for t in _inputs(global_b)[:2])
    ref = _statistics_loss(method, z1, z2, _byol_targets(global_b) if method == "byol" else None)
    ref.backward()
    got = [out[r]["statistics"][method] for r in range(world)]
    torch.testing.assert_close(sum(g[0] for g in got) / world, ref.detach(), rtol=1e-10, atol=1e-12)
    b = global_b // world
    for r in range(world):
        for g, leaf in zip(got[r][1], (z1, z2)):
            torch.testing.assert_close(g / world, leaf.grad[r * b:(r + 1) * b], rtol=1e-10, atol=1e-12)


def _bn_inputs():
    """12 images: whole shares for 2 and 3 ranks."""
    x = torch.randn(12, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 2
    w = torch.randn(12, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    return x, w


@pytest.mark.slow
@pytest.mark.parametrize("affine", AFFINE)
def test_cpu_sync_batchnorm_equals_batchnorm_over_the_global_batch(ranks, affine):
    world, out = ranks
    x, w = _bn_inputs()
    bn = torch.nn.BatchNorm2d(3, affine=affine)
    xr = x.clone().requires_grad_()
    (bn(xr) * w).sum().backward()
    got = [out[r]["bn"][affine] for r in range(world)]
    y = torch.cat([got[r][0] for r in range(world)])
    reference = torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, training=True).detach()
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([got[r][1] for r in range(world)]), xr.grad, rtol=1e-4, atol=1e-5)
    if affine:  # each rank's weight gradient is its share; DDP sums (averages x world) them
        torch.testing.assert_close(sum(got[r][2] for r in range(world)), bn.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0][3], bn.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("crops", list(KERNEL_CASES))
@pytest.mark.parametrize("tau_kl", TAUS_KL)
def test_kernel_ranks_equal_the_global_batch(ranks, tau_kl, crops):
    from dogo.engine.ssl.contrastive import contrastive_terms
    world, out = ranks
    global_b = 5 * world
    leaves = [torch.nn.functional.normalize(t, dim=1).requires_grad_() for t in _crops(global_b, crops)]
    ref = contrastive_terms([leaves[:crops], leaves[crops:]], (0.2, 0.5), tau_kl, KERNEL_CASES[crops],
                            tile=global_b)
    ref.sum().backward()
    got = [out[r]["kernel"][(tau_kl, crops)] for r in range(world)]
    b = global_b // world
    for r in range(world):
        # each rank's own loss and gradients equal the straightforward gather-with-gradient version's
        kern, straight = got[r]["kernel"], got[r]["straightforward"]
        torch.testing.assert_close(kern[0], straight[0], rtol=1e-12, atol=1e-12)
        for a, s in zip(kern[1], straight[1]):
            torch.testing.assert_close(a, s, rtol=1e-10, atol=1e-12)
    # the mean of the ranks' terms is the one-process global batch; rank gradients are world x its share
    mean_terms = sum(got[r]["kernel"][0] for r in range(world)) / world
    torch.testing.assert_close(mean_terms, ref.detach(), rtol=1e-12, atol=1e-12)
    for r in range(world):
        for g, full in zip(got[r]["kernel"][1], leaves):
            torch.testing.assert_close(g / world, full.grad[r * b:(r + 1) * b], rtol=1e-10, atol=1e-12)

"""MoCo v2, SimSiam, DisCo and DoGo with mixed objectives: losses and gradients against float64 references written
row by row, the key encoder's momentum update and queue (also under a 2-process gloo group), and the teacher."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dogo.core.errors import ConfigError

from dogo.engine.config import ObjectiveConfig, PeerConfig, TeacherConfig
from dogo.engine.ssl.contrastive import contrastive_terms
from dogo.engine.ssl.losses import embedding_distance, mocov2_loss, reference_terms, simsiam_loss
from dogo.engine.ssl.objectives import objective_loss
from dogo.engine.ssl.methods import MoCoV2Settings
from dogo.engine.ssl.momentum import KeyQueue, MomentumEncoder, momentum_at
from dogo.engine.ssl.peers import Crops
from dogo.engine.ssl.targets import Targets
from dogo.models import Peer
from tests.helpers import gloo_ranks


def _rand(*shape, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)


def _unit(*shape, seed):
    return F.normalize(_rand(*shape, seed=seed, requires_grad=False), dim=1)


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_mocov2_loss_equals_a_row_by_row_reference():
    b, d, k, tau = 5, 6, 9, 0.2
    q1, q2 = F.normalize(_rand(b, d, seed=1), dim=1), F.normalize(_rand(b, d, seed=2), dim=1)
    r1, r2 = q1.detach(), q2.detach()
    k1, k2, queue = _unit(b, d, seed=3), _unit(b, d, seed=4), _unit(k, d, seed=5)
    got = mocov2_loss([q1, q2], [k1, k2], queue, tau)

    def infonce_row(q, key):  # -log( exp(q.k+/t) / (exp(q.k+/t) + sum_n exp(q.n/t)) ) for one query
        pos = math.exp(float(q @ key) / tau)
        neg = sum(math.exp(float(q @ n) / tau) for n in queue)
        return -math.log(pos / (pos + neg))

    ref = 0.5 * (sum(infonce_row(r1[i], k2[i]) for i in range(b)) / b
                 + sum(infonce_row(r2[i], k1[i]) for i in range(b)) / b)
    assert got.item() == pytest.approx(ref, rel=1e-12)
    # gradient: d/dq of InfoNCE = (softmax - onehot) @ [k+; queue] / tau, per row, scaled by 1/(2b)
    g1, = torch.autograd.grad(got, q1, retain_graph=True)
    keys = torch.cat([k2[:1], queue])
    logits = torch.cat([(q1[0] * k2[0]).sum()[None], queue @ q1[0]]).detach() / tau
    p = torch.softmax(logits, 0)
    p[0] -= 1
    torch.testing.assert_close(g1[0], p @ keys / tau / (2 * b), rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda a, c: mocov2_loss([F.normalize(a, dim=1), F.normalize(c, dim=1)],
                                                             [k1, k2], queue, tau),
                                    (_rand(b, d, seed=6), _rand(b, d, seed=7)))
    one_way = mocov2_loss([q1, q2], [None, k2], queue, tau)  # MoCo's own form: view-1 queries, view-2 keys
    assert one_way.item() == pytest.approx(sum(infonce_row(r1[i], k2[i]) for i in range(b)) / b, rel=1e-12)


def test_simsiam_loss_equals_reference_and_stops_the_gradient():
    b, d = 4, 5
    z1, z2, p1, p2 = (_rand(b, d, seed=s) for s in range(10, 14))
    got = simsiam_loss(z1, z2, p1, p2)
    ref = -0.5 * (sum(_cos(p1[i].tolist(), z2[i].tolist()) for i in range(b)) / b
                  + sum(_cos(p2[i].tolist(), z1[i].tolist()) for i in range(b)) / b)
    assert got.item() == pytest.approx(ref, rel=1e-12)
    gz1, gz2, gp1, gp2 = torch.autograd.grad(got, (z1, z2, p1, p2), allow_unused=True, materialize_grads=True)
    assert not gz1.any() and not gz2.any(), "the projections must be behind a stop-gradient"
    assert torch.autograd.gradcheck(lambda a, c: simsiam_loss(z1, z2, a, c), (p1, p2))


def test_disco_distance_equals_reference_with_a_constant_teacher():
    b, d = 6, 7
    s, t = _rand(b, d, seed=20), _rand(b, d, seed=21)
    got = embedding_distance(s, t)
    ref = 0.0
    for i in range(b):
        ns, nt = math.sqrt(sum(x * x for x in s[i].tolist())), math.sqrt(sum(x * x for x in t[i].tolist()))
        ref += sum((x / ns - y / nt) ** 2 for x, y in zip(s[i].tolist(), t[i].tolist()))
    assert got.item() == pytest.approx(ref, rel=1e-12)  # summed over the rows, as DisCo's MSELoss(reduction='sum')
    _, gt = torch.autograd.grad(got, (s, t), allow_unused=True, materialize_grads=True)
    assert not gt.any(), "the teacher gets no gradient"
    assert torch.autograd.gradcheck(lambda a: embedding_distance(a, t), (s,))


@pytest.mark.parametrize("tile", [2, 3, 64])
def test_kernel_with_a_kl_only_peer_equals_straightforward(tile):
    """A SimSiam or MoCo peer of DoGo enters the kernel with tau None: KL terms only."""
    zs = [F.normalize(_rand(7, 5, seed=30 + i, requires_grad=False), dim=1).requires_grad_() for i in range(4)]
    for taus in [(0.3, None), (None, 0.5), (None, None)]:
        w = torch.rand(2 + sum(t is not None for t in taus), generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64) + 0.5
        got = contrastive_terms([zs[:2], zs[2:]], taus, 0.2, tile=tile)
        ref = reference_terms([zs[:2], zs[2:]], taus, 0.2)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        g_got = torch.autograd.grad((got * w).sum(), zs)
        g_ref = torch.autograd.grad((ref * w).sum(), zs)
        for a, r in zip(g_got, g_ref):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_dogo_with_a_simclr_and_a_simsiam_peer_composes_the_terms():
    """Peer a (SimCLR): NT-Xent + its KL on z1 x z2; peer b (SimSiam): negative cosine + its KL on p1 x p2."""
    b, d = 6, 8
    a1, a2, z1, z2, p1, p2 = (_rand(b, d, seed=40 + i) for i in range(6))
    peers = {"a": PeerConfig(ssl="simclr", tau=0.3, kl_weight=0.7), "b": PeerConfig(ssl="simsiam", kl_weight=0.4)}
    loss, terms = objective_loss({"a": Crops.of([a1, a2]), "b": Crops.of([z1, z2], [p1, p2])},
                                 ObjectiveConfig(name="dogo", tau_kl=0.2, tile=1024), peers)
    n = lambda x: F.normalize(x, dim=1)
    ref = reference_terms([[n(a1), n(a2)], [n(p1), n(p2)]], (0.3, None), 0.2)
    siam = simsiam_loss(z1, z2, p1, p2)
    want = ref[0] + 0.7 * ref[1] + siam + 0.4 * ref[2]
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    assert set(terms) == {"a/ntxent", "a/kl", "b/simsiam", "b/kl", "loss"}
    leaves = (a1, a2, z1, z2, p1, p2)  # z1, z2 are only SimSiam's stop-gradient targets: no gradient
    got = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    exp = torch.autograd.grad(want, leaves, allow_unused=True, materialize_grads=True)
    assert not got[2].any() and not got[3].any() and got[4].any() and got[5].any()
    for x, y in zip(got, exp):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_objective_loss_for_mocov2_and_disco_uses_the_targets():
    b, d = 5, 4
    q1, q2 = _rand(b, d, seed=50), _rand(b, d, seed=51)
    k2, queue = _unit(b, d, seed=53), _unit(11, d, seed=54)
    t1, t2 = _rand(b, d, seed=55, requires_grad=False), _rand(b, d, seed=56, requires_grad=False)
    targets = Targets(method={"s": (None, k2, queue)}, teacher={"s": (t1, t2)})
    peers = {"s": PeerConfig(ssl="mocov2", tau=0.2)}
    loss, terms = objective_loss({"s": Crops.of([q1, q2])}, ObjectiveConfig(name="disco", distill_weight=0.3, tile=1024),
                                 peers, targets)
    n = lambda x: F.normalize(x, dim=1)
    moco = mocov2_loss([n(q1), n(q2)], [None, k2], queue, 0.2)
    dist_ = embedding_distance(q1, t1) + embedding_distance(q2, t2)
    torch.testing.assert_close(loss, moco + 0.3 * dist_, rtol=1e-12, atol=1e-14)
    assert set(terms) == {"s/infonce", "s/distill", "loss"}


def _tiny_peer(seed):
    torch.manual_seed(seed)
    return Peer("resnet18", True, 16, 8)


def test_momentum_update_is_exact_and_follows_its_schedule():
    query = _tiny_peer(0)
    enc = MomentumEncoder(query, 0.5)
    for a, b in zip(enc.encoder.parameters(), query.parameters()):
        assert torch.equal(a, b) and not a.requires_grad  # MoCo starts the key encoder as a copy
    before = [p.detach().double().clone() for p in enc.encoder.parameters()]
    with torch.no_grad():
        for p in query.parameters():
            p.add_(torch.randn_like(p))
    enc.set_momentum(0.9)
    enc.follow(query)
    for k, k0, q in zip(enc.encoder.parameters(), before, query.parameters()):
        torch.testing.assert_close(k.double(), 0.9 * k0 + 0.1 * q.double(), rtol=1e-6, atol=1e-7)
    assert momentum_at(0.99, "constant", 50, 100) == 0.99
    assert momentum_at(0.99, "cosine", 0, 100) == pytest.approx(0.99)
    assert momentum_at(0.99, "cosine", 50, 100) == pytest.approx(0.995)
    assert momentum_at(0.99, "cosine", 100, 100) == pytest.approx(1.0)


def test_queue_is_a_ring_of_the_newest_keys():
    enc = KeyQueue(7, 8, seed=3)
    start = enc.queue.clone()
    written = []
    for step in range(5):
        keys = _unit(3, 8, seed=60 + step).float()
        enc.enqueue(keys)
        written += list(keys)
        assert enc.negatives().shape == (7, 8)  # always the whole queue: random start keys until overwritten
        for pos in range(len(written), 7):
            assert torch.equal(enc.queue[pos], start[pos])
        # every stored key is one of the newest 7 written, at its ring position
        for i, row in enumerate(written[-7:]):
            pos = (len(written) - len(written[-7:]) + i) % 7
            assert torch.equal(enc.queue[pos], row)
    state = enc.state_dict()
    again = KeyQueue(7, 8)
    again.load_state_dict(state)
    assert again.ptr == enc.ptr and torch.equal(again.queue, enc.queue)


SYMMETRIC = (False, True)


def _queue_on_rank(rank, symmetric):
    from dogo.engine.config import Config
    from dogo.engine.ssl.targets import TargetMakers
    cfg = Config()
    cfg.objective.name = "mocov2"
    cfg.peers = {"m": PeerConfig(arch="resnet18", cifar_stem=True, head_hidden=16, head_out=8, ssl="mocov2",
                                 mocov2=MoCoV2Settings(queue_size=20, symmetric=symmetric))}
    torch.manual_seed(rank)  # the peers' weights differ by rank here; the queue's start must not
    peers = torch.nn.ModuleDict({"m": Peer("resnet18", True, 16, 8)})
    makers = TargetMakers(cfg, peers)
    start = makers.states["m"].queue.queue.clone()
    for step in range(4):  # 4 steps x 2 ranks x 3 images x (2 views, or view 2 only) through a queue of 20
        k1, k2 = _unit(3, 8, seed=100 * step + rank).float(), _unit(3, 8, seed=100 * step + 50 + rank).float()
        makers.schedule(step + 1, 4, 4)
        makers.after_step(peers, Targets(method={"m": (k1 if symmetric else None, k2, None)}))
    queue = makers.states["m"].queue
    return start, queue.queue.clone(), queue.ptr


def _queue_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out[rank] = {symmetric: _queue_on_rank(rank, symmetric) for symmetric in SYMMETRIC}  # one spawn for both
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def queues_of_two_ranks():
    return gloo_ranks(_queue_worker, 2)


@pytest.mark.slow
@pytest.mark.parametrize("symmetric", SYMMETRIC)
def test_queue_under_two_gloo_ranks_holds_every_ranks_keys(queues_of_two_ranks, symmetric):
    world = 2
    out = {r: queues_of_two_ranks[r][symmetric] for r in range(world)}
    expected = []
    for step in range(4):  # the order enqueued: view 1 of rank 0, rank 1 (symmetric only), then view 2's
        if symmetric:
            expected += [_unit(3, 8, seed=100 * step + r).float() for r in range(world)]
        expected += [_unit(3, 8, seed=100 * step + 50 + r).float() for r in range(world)]
    keys = torch.cat(expected)  # the queue holds the newest 20 at their ring positions, the start keys elsewhere
    ring = out[0][0].clone()
    for i in range(len(keys)):
        ring[i % 20] = keys[i]
    assert torch.equal(out[0][0], out[1][0]), "the ranks' queues must start equal"
    for r in range(world):
        start, queue, ptr = out[r]
        assert ptr == len(keys) % 20
        assert torch.equal(queue, ring), f"rank {r}'s queue differs from the keys enqueued"


def test_teacher_config_errors():
    from dogo.engine.config import Config, check
    cfg = Config()
    cfg.objective.name = "disco"
    with pytest.raises(ConfigError, match="exactly one source"):
        check(cfg)
    cfg.teacher = TeacherConfig(backbone="b.pt", head="h.pt")
    with pytest.raises(ConfigError, match="missing: teacher.arch"):
        check(cfg)


@pytest.mark.parametrize("method", sorted(__import__("dogo.engine.ssl.methods", fromlist=["METHODS"]).METHODS))
def test_every_registered_method_trains_a_step(method, tmp_path):
    """Each method of the registry, alone: one optimiser step on synthetic batches changes every trained parameter,
    its loss term is finite, and its key encoder (if it has one) follows."""
    from dogo.engine import config as config_mod
    from dogo.core.registry import METHODS
    from dogo.engine.run.trainer import Trainer
    raw = {"name": "t", "out_dir": str(tmp_path), "seed": 1, "device": "cpu",
           "data": {"backend": "synthetic", "synthetic": {"images": 16}, "image_size": 16, "batch_size": 8},
           "peers": {"p": {"arch": "resnet18", "head_hidden": 16, "head_out": 8,
                           "simsiam": {"pred_hidden": 8}, "mocov2": {"queue_size": 32},
                           # DINO's last layer takes no update in its first epoch (tests/test_dino.py)
                           "dino": {"prototypes": 16, "freeze_last_layer_epochs": 0}}},
           "objective": {"name": method}, "optim": {"name": "sgd", "lr": 0.5},
           "schedule": {"max_steps": 2, "warmup_epochs": 0}, "eval": {"knn_every_epochs": 0},
           "log": {"progress": "off", "tensorboard": "off"}}
    trainer = Trainer(config_mod.stored(raw))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    terms = trainer.step(next(iter(trainer.loader)))
    assert torch.isfinite(terms["loss"]) and len(terms) >= 2
    unchanged = [k for k, v in trainer.model.named_parameters() if v.requires_grad and torch.equal(v, before[k])]
    assert not unchanged, f"{method}: parameters without a gradient: {unchanged[:5]}"
    assert bool(trainer.targets.states) == (METHODS.get(method, "ssl").make_state(
        trainer.cfg.peers["p"], trainer.model.peers["p"], 0) is not None)

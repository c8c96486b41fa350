"""Our objectives against ports of the papers' official code, on random embeddings in float64, loss and gradients.

Each port is written here in our own words after the official function it follows (named in its docstring); it is
the test's reference, not code the trainer runs.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from dogo.engine.config import ObjectiveConfig, PeerConfig
from dogo.engine.ssl.losses import mocov2_loss
from dogo.engine.ssl.peers import Crops
from dogo.engine.ssl.objectives import objective_loss
from dogo.engine.ssl.momentum import KeyQueue
from dogo.engine.ssl.targets import Targets
from dogo.engine.ssl.teacher import FrozenTeacher
from dogo.models import Peer


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


# ---- DoGo: NeurAI-Lab/DoGo, branch dogo -------------------------------------------------------------------------

def official_dogo_kl(zxs, zys, zxt, zyt, temperature):
    """criterion/kl.py, KLLoss.forward: softmax over cosine similarities of view-x rows against view-y columns for
    a 'student' pair and a 'teacher' pair; each side's KL to the other, detached, with kl_div's element mean over
    the B x B entries. Returns (loss_s, loss_t)."""
    def probs(a, b):
        return F.softmax(F.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=2) / temperature, dim=1)
    p_s, p_t = probs(zxs, zys), probs(zxt, zyt)
    loss_s = F.kl_div(p_s.log(), p_t.detach(), reduction="mean")
    loss_t = F.kl_div(p_t.log(), p_s.detach(), reduction="mean")
    return loss_s, loss_t


def official_dogo_peer_kl(kind1, out1, kind2, out2, temperature):
    """util/train_util.py, train_one_epoch: which outputs enter the KL. A SimCLR model returns its normalised
    projections (px, py); a SimSiam model its normalised projections (zx, zy) and predictions (px, py). Two SimSiam
    models: KL(px1, py1 | zx2, zy2) for model 1, KL(zx1, zy1 | px2, py2) for model 2; otherwise KL(px1, py1 | px2,
    py2) with each model's px, py."""
    n = lambda t: F.normalize(t, dim=1)
    def px_py(kind, out):
        return (n(out[0]), n(out[1])) if kind == "simclr" else (n(out[2]), n(out[3]))
    if kind1 == kind2 == "simsiam":
        loss1, _ = official_dogo_kl(n(out1[2]), n(out1[3]), n(out2[0]), n(out2[1]), temperature)
        _, loss2 = official_dogo_kl(n(out1[0]), n(out1[1]), n(out2[2]), n(out2[3]), temperature)
        return loss1, loss2
    return official_dogo_kl(*px_py(kind1, out1), *px_py(kind2, out2), temperature)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("kinds", [("simclr", "simclr"), ("simclr", "simsiam"), ("simsiam", "simclr"),
                                   ("simsiam", "simsiam")])
def test_dogo_kl_follows_the_official_choice_of_embeddings(kinds):
    b, d, tau_kl = 6, 5, 0.2
    raw = {name: tuple(_rand(b, d, seed=10 * k + i) for i in range(2 if kind == "simclr" else 4))
           for k, (name, kind) in enumerate(zip("ab", kinds))}
    outs = {name: Crops.of(t[:2], t[2:] or None) for name, t in raw.items()}
    weights = {"a": 0.7, "b": 1.3}

    def ours(scale):
        peers = {name: PeerConfig(ssl=kind, tau=0.5 if kind == "simclr" else None, kl_weight=scale * weights[name])
                 for name, kind in zip("ab", kinds)}
        return objective_loss(outs, ObjectiveConfig(name="dogo", tau_kl=tau_kl, tile=4), peers)

    loss, terms = ours(1.0)
    loss_no_kl, _ = ours(0.0)
    kl1, kl2 = official_dogo_peer_kl(kinds[0], raw["a"], kinds[1], raw["b"], tau_kl)
    # ours averages over the b rows; the official element mean divides by b * b as well: a factor of b
    torch.testing.assert_close(terms["a/kl"], b * kl1.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms["b/kl"], b * kl2.detach(), rtol=1e-10, atol=1e-12)
    leaves = [t for name in "ab" for t in raw[name]]
    kl_ours = torch.autograd.grad(loss - loss_no_kl, leaves, allow_unused=True, materialize_grads=True)
    kl_ref = torch.autograd.grad(b * (weights["a"] * kl1 + weights["b"] * kl2), leaves, allow_unused=True,
                                 materialize_grads=True)
    for got, want in zip(kl_ours, kl_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# ---- MoCo v2: facebookresearch/moco -----------------------------------------------------------------------------

class OfficialMoCoQueue:
    """moco/builder.py, MoCo: the queue as a (dim, K) buffer of normalised Gaussian columns; the loss of
    forward() (positive logit q.k, negatives q.queue, over T, cross-entropy against index 0); _dequeue_and_enqueue
    writes the gathered keys' columns at the pointer and moves it on."""

    def __init__(self, queue_rows: torch.Tensor):
        self.queue = queue_rows.T.clone()  # the official layout is (dim, K)
        self.ptr = 0

    def loss(self, q, k, T):
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / T
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))

    def dequeue_and_enqueue(self, keys):
        n = keys.shape[0]
        assert self.queue.shape[1] % n == 0  # the official simplification
        self.queue[:, self.ptr:self.ptr + n] = keys.T
        self.ptr = (self.ptr + n) % self.queue.shape[1]


def _tiny_peer(seed):
    torch.manual_seed(seed)
    return Peer("resnet18", True, 16, 8)


def test_mocov2_queue_starts_random_and_rings_as_the_official_one():
    enc = KeyQueue(12, 8, seed=4)
    queue = enc.negatives()
    assert queue.shape == (12, 8) and queue.norm(dim=1).sub(1).abs().max() < 1e-6  # unit keys, as MoCo's
    torch.manual_seed(1)
    assert torch.equal(KeyQueue(12, 8, seed=4).queue, queue), "the start depends on the seed alone"
    assert not torch.equal(KeyQueue(12, 8, seed=5).queue, queue)
    enc.double()  # float64 keys, as the port's
    official = OfficialMoCoQueue(enc.queue)
    q = F.normalize(_rand(4, 8, seed=1), dim=1)
    for step in range(5):  # 5 x 4 keys through 12: wraps around
        k = F.normalize(_rand(4, 8, seed=20 + step), dim=1).detach()
        want = official.loss(q, k, 0.2)
        got = mocov2_loss([q], [None, k], enc.negatives(), 0.2)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        if step == 0:
            assert got > 0 and torch.autograd.grad(got, q)[0].abs().max() > 0, "the first step has negatives"
        official.dequeue_and_enqueue(k)
        enc.enqueue(k)
        assert torch.equal(enc.queue, official.queue.T)
        assert enc.ptr == official.ptr


# ---- DisCo: Yuting-Gao/DisCo-pytorch ----------------------------------------------------------------------------

def official_disco_loss(q_raw, qk_raw, k, queue, teacher_q, teacher_qk, T):
    """DisCo/main.py train() with moco/builder_kq_mse_largeembedding_2048.py MoCo.forward: the student's
    normalised query embeddings of both views (q from im_q, qk from im_k), MoCo's cross-entropy for q against the
    key of im_k and the queue, plus MSELoss(reduction='sum') to the teacher's normalised embeddings of each view,
    weights 1."""
    q, qk = F.normalize(q_raw, dim=1), F.normalize(qk_raw, dim=1)
    moco = OfficialMoCoQueue(queue).loss(q, k, T)
    mse = torch.nn.MSELoss(reduction="sum")
    return moco + mse(teacher_q, q) + mse(teacher_qk, qk)


def test_disco_loss_equals_the_official_one():
    b, d, K, T = 6, 8, 10, 0.2
    s1, s2 = _rand(b, d, seed=1), _rand(b, d, seed=2)
    k2 = F.normalize(_rand(b, d, seed=3), dim=1).detach()
    queue = F.normalize(_rand(K, d, seed=4), dim=1).detach()
    t1, t2 = (F.normalize(_rand(b, d, seed=s), dim=1).detach() for s in (5, 6))
    peers = {"s": PeerConfig(ssl="mocov2", tau=T)}  # MoCo v2's own form is the default
    targets = Targets(method={"s": (None, k2, queue)}, teacher={"s": (t1, t2)})
    loss, _ = objective_loss({"s": Crops.of([s1, s2])}, ObjectiveConfig(name="disco", tile=1024), peers, targets)
    want = official_disco_loss(s1, s2, k2, queue, t1, t2, T)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    for got, ref in zip(torch.autograd.grad(loss, (s1, s2)), torch.autograd.grad(want, (s1, s2))):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def _teacher_with_running_stats():
    peer = _tiny_peer(7).double()
    g = torch.Generator().manual_seed(8)
    for m in peer.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
    return peer


@pytest.mark.parametrize("bn", ["eval", "batch"])
def test_disco_teacher_bn_modes_follow_the_official_teacher(bn):
    """bn=batch: DisCo's main.py calls model.train() on the whole model, so its teacher normalises each view with
    that view's batch statistics (teacher_q and teacher_qk are separate forwards). bn=eval: the running statistics.
    In both modes our teacher's weights and running statistics stay as they were."""
    peer = _teacher_with_running_stats()
    before = {k: v.clone() for k, v in peer.state_dict().items()}
    ours = FrozenTeacher(copy.deepcopy(peer), "test", bn=bn)
    ours.train()  # what the trainer may call: changes nothing
    official = copy.deepcopy(peer).requires_grad_(False).train(bn == "batch")
    v1, v2 = (torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
              for s in (1, 2))
    with torch.no_grad():
        want = official(v1), official(v2)
    got = ours.embed(torch.cat([v1, v2]), 2).chunk(2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    for key, value in ours.peer.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher buffer {key} changed"
    if bn == "batch":  # the official teacher's running statistics drift; ours do not
        drifted = [k for k, v in official.state_dict().items() if "running_mean" in k and not torch.equal(v, before[k])]
        assert drifted

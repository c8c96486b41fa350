"""Methods and objectives on crops (2 large + 3 local here): each against a reference written crop by crop as
solo-learn's loops compute it, which crops momentum networks, the teacher and the online probe see, and steps of
multi-crop runs."""
import math

import pytest
import torch
import torch.nn.functional as F

from dogo.engine import config as config_mod
from dogo.engine.config import ObjectiveConfig, PeerConfig
from dogo.engine.ssl.losses import embedding_distance, infonce_with_queue, ntxent, reference_terms
from dogo.engine.ssl.objectives import kl_pairs, objective_loss
from dogo.engine.ssl.peers import Crops
from dogo.engine.ssl.targets import Targets
from dogo.models import Peer

B, D, LARGE, CROPS = 5, 6, 2, 5


def _rand(*shape, seed, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


def _crops(seed, n=CROPS):
    return [_rand(B, D, seed=seed + v) for v in range(n)]


def _loss(method, crops, predictions=None, targets=None, objective=None, **peer):
    peers = {"p": PeerConfig(ssl=method, **peer)}
    t = Targets(method={"p": targets}) if targets is not None else None
    out = Crops.of(crops, predictions, LARGE)
    return objective_loss({"p": out}, ObjectiveConfig(name=objective or method, tile=3), peers, t)


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_simclr_takes_every_crop_as_rows_and_positives():
    crops = _crops(1)
    loss, terms = _loss("simclr", crops, tau=0.3)
    want = ntxent([F.normalize(z, dim=1) for z in crops], 0.3)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    assert set(terms) == {"p/ntxent", "loss"}


def test_byol_sums_every_crop_against_every_other_large_crop_as_solo_learn():
    """solo-learn's BYOL: for v1 in the large crops, for v2 in every crop but v1: 2 - 2 cos(p[v2], target[v1])."""
    z, p = _crops(10), _crops(20)
    targets = tuple(F.normalize(_rand(B, D, seed=30 + g, grad=False), dim=1) for g in range(LARGE))
    loss, _ = _loss("byol", z, p, targets)
    want = 0.0
    for v1 in range(LARGE):
        for v2 in range(CROPS):
            if v2 != v1:
                want += 2 - 2 * sum(_cos(p[v2][i].tolist(), targets[v1][i].tolist()) for i in range(B)) / B
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert all(g.abs().max() > 0 for g in torch.autograd.grad(loss, p))  # every crop's prediction learns


def test_mocov2_queries_of_every_other_crop_against_the_large_crops_keys():
    """MoCo under DoGo or DisCo: each crop queries every large crop's keys but its own, averaged; its own form has
    crop 1's keys only, so crop 0 and the local crops query them."""
    q = _crops(40)
    keys = [F.normalize(_rand(B, D, seed=50 + g, grad=False), dim=1) for g in range(LARGE)]
    queue = F.normalize(_rand(9, D, seed=60, grad=False), dim=1)
    n = [F.normalize(x, dim=1) for x in q]
    for symmetric, made in ((False, (None, keys[1])), (True, tuple(keys))):
        loss, _ = _loss("mocov2", q, targets=(*made, queue), tau=0.2)
        pairs = [(v, g) for g in range(LARGE) if made[g] is not None for v in range(CROPS) if v != g]
        want = sum(infonce_with_queue(n[v], keys[g], queue, 0.2) for v, g in pairs) / len(pairs)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
        assert len(pairs) == (4 if not symmetric else 8)


@pytest.mark.parametrize("method", ["simsiam", "vicreg", "barlowtwins"])
def test_two_crop_methods_take_the_large_crops_only(method):
    """As solo-learn's: the loss of 2 + 3 crops is the loss of the two large ones, and the locals get no gradient
    from it."""
    z, p = _crops(70), _crops(80)
    predictions = p if method == "simsiam" else None
    many, _ = _loss(method, z, predictions, objective=method)
    two, _ = _loss(method, z[:2], predictions[:2] if predictions else None, objective=method)
    torch.testing.assert_close(many, two, rtol=0, atol=0)
    grads = torch.autograd.grad(many, z + (p if predictions else []), allow_unused=True, materialize_grads=True)
    assert all(not g.any() for g in grads[2:CROPS])


def test_dogo_kl_covers_every_pair_with_a_large_crop():
    assert kl_pairs(2, 2) == [(0, 1)]  # two views: DoGo's own view-1 rows x view-2 columns
    assert kl_pairs(2, 5) == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4)]
    assert len(kl_pairs(2, 8)) == 13  # 2 x 224 + 6 x 96
    a, b = _crops(100), _crops(110)
    peers = {"a": PeerConfig(ssl="simclr", tau=0.3, kl_weight=0.7), "b": PeerConfig(ssl="simclr", tau=0.4,
                                                                                       kl_weight=1.3)}
    loss, terms = objective_loss({"a": Crops.of(a, None, LARGE), "b": Crops.of(b, None, LARGE)},
                                 ObjectiveConfig(name="dogo", tau_kl=0.2, tile=2), peers)
    n = lambda zs: [F.normalize(z, dim=1) for z in zs]
    pairs = [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4)]
    ref = reference_terms([n(a), n(b)], (0.3, 0.4), 0.2, pairs)
    torch.testing.assert_close(torch.stack([terms["a/ntxent"], terms["b/ntxent"], terms["a/kl"], terms["b/kl"]]),
                               ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref[0] + ref[1] + 0.7 * ref[2] + 1.3 * ref[3], rtol=1e-10, atol=1e-12)


def test_disco_distance_over_crops_written_out():
    s = _crops(120)
    teacher = tuple(_rand(B, D, seed=130 + g, grad=False) for g in range(LARGE))
    peers = {"s": PeerConfig(ssl="simclr", tau=0.5)}
    loss, terms = objective_loss({"s": Crops.of(s, None, LARGE)},
                                 ObjectiveConfig(name="disco", distill_weight=0.3, tile=4), peers,
                                 Targets(teacher={"s": teacher}))
    d = lambda x, y: sum(sum((u / math.sqrt(sum(w * w for w in x[i])) - t / math.sqrt(sum(w * w for w in y[i])))
                             ** 2 for u, t in zip(x[i], y[i])) for i in range(B))
    own = sum(d(s[g].tolist(), teacher[g].tolist()) for g in range(LARGE))
    local = sum(d(s[v].tolist(), teacher[g].tolist()) for v in range(LARGE, CROPS) for g in range(LARGE)) / LARGE
    assert terms["s/distill"].item() == pytest.approx(own + local, rel=1e-12)
    assert embedding_distance(s[0], teacher[0]).item() == pytest.approx(d(s[0].tolist(), teacher[0].tolist()))


PLAN = "views={global: {count: 2}, local: {count: 3, size: 8}}"


def _config(tmp_path, objective, peers, *extra):
    return config_mod.load(None, [
        "device=cpu", f"out_dir={tmp_path}", "seed=1", "data.backend=synthetic", "data.synthetic.images=16",
        "data.image_size=16", "data.batch_size=4", f"objective.name={objective}", f"peers={peers}", PLAN,
        "schedule.max_steps=2", "schedule.warmup_epochs=0", "eval.knn_every_epochs=0", "log.tensorboard=off",
        "optim.name=sgd", "optim.lr=0.5", *extra])


def _rows_seen(module):
    """A forward hook's record of the rows each forward of `module` took."""
    rows = []
    module.register_forward_hook(lambda m, inputs, output: rows.append(inputs[0].shape[0]))
    return rows


TINY = "{arch: resnet18, head_hidden: 16, head_out: 8"


@pytest.mark.parametrize("symmetric", [False, True])
def test_momentum_networks_see_the_large_crops_only(tmp_path, symmetric):
    """MoCo's key encoder embeds crop 1 (b rows) or both large crops (2 b) and BYOL's target network both large
    crops, never the local ones; the peer itself forwards every crop, each size once."""
    from dogo.engine.run.trainer import Trainer
    moco = f"{TINY}, ssl: mocov2, mocov2: {{queue_size: 32, symmetric: {str(symmetric).lower()}}}}}"
    byol = f"{TINY}, ssl: byol, byol: {{pred_hidden: 8}}}}"
    trainer = Trainer(_config(tmp_path, "dogo", f"{{m: {moco}, y: {byol}}}"))
    keys = _rows_seen(trainer.targets.states["m"].key_encoder.encoder.backbone)
    target = _rows_seen(trainer.targets.states["y"].target.encoder.backbone)
    peer = _rows_seen(trainer.model.peers["m"].backbone)
    trainer.step(next(iter(trainer.loader)))
    assert keys == [(2 if symmetric else 1) * 4] and target == [2 * 4] and peer == [2 * 4, 3 * 4]


def test_the_disco_teacher_sees_the_large_crops_and_the_student_all(tmp_path):
    from dogo.engine.run.trainer import Trainer
    torch.manual_seed(5)
    t = Peer("resnet18", False, 16, 8)
    torch.save(t.backbone.state_dict(), tmp_path / "bb.pt")
    torch.save(t.head.state_dict(), tmp_path / "head.pt")
    trainer = Trainer(_config(tmp_path, "disco", f"{{s: {TINY}, ssl: simclr}}}}",
                              f"teacher.backbone={tmp_path / 'bb.pt'}", f"teacher.head={tmp_path / 'head.pt'}",
                              "teacher.arch=resnet18"))
    teacher = _rows_seen(trainer.targets.teacher.peer.backbone)
    student = _rows_seen(trainer.model.peers["s"].backbone)
    terms = trainer.step(next(iter(trainer.loader)))
    assert teacher == [2 * 4] and student == [2 * 4, 3 * 4]
    assert torch.isfinite(terms["s/distill"]) and torch.isfinite(terms["s/ntxent"])


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_a_multi_crop_step_trains_every_parameter(tmp_path, method):
    from dogo.engine.run.trainer import Trainer
    trainer = Trainer(_config(tmp_path, method, f"{{p: {TINY}, byol: {{pred_hidden: 8}}}}}}"
                              if method == "byol" else f"{{p: {TINY}}}}}"))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    terms = trainer.step(next(iter(trainer.loader)))
    assert torch.isfinite(terms["loss"])
    unchanged = [k for k, v in trainer.model.named_parameters() if torch.equal(v, before[k])]
    assert not unchanged, unchanged[:5]


def test_the_online_probe_learns_from_the_large_crops_only(tmp_path):
    from dogo.engine.eval.online import OnlineProbe
    from dogo.engine.ssl.peers import build_peers
    from dogo.pipelines.base import ViewBatch
    cfg = _config(tmp_path, "simclr", f"{{p: {TINY}}}}}")
    model = build_peers(cfg)
    probe = OnlineProbe(model.peers, 10, 0.1, 0, torch.device("cpu"), False)
    groups = [torch.randn(2 * 4, 3, 16, 16), torch.randn(3 * 4, 3, 8, 8)]
    probe.capturing = True
    model(groups)
    probe.capturing = False
    assert probe._features["p"].shape[0] == 2 * 4  # the large crops' features: labels repeat twice
    terms = probe.step(torch.arange(4))
    assert torch.isfinite(terms["probe/p/loss"])
    assert ViewBatch(groups, torch.arange(4)).large(model.plan, 0).shape[0] == 2 * 4


def test_a_backbone_too_large_for_the_small_crops_is_named_with_the_key():
    pytest.importorskip("timm")
    from dogo.core.errors import ConfigError
    from dogo.core.precision import Precision
    from dogo.engine.run.memory import memory_model
    cfg = config_mod.load(None, ["device=cpu", "data.image_size=32", "objective.name=simclr",
                                 "peers={v: {arch: 'timm:vit_tiny_patch16_224', arch_args: {patch_size: 16}}}",
                                 "views={global: {count: 2}, local: {count: 2, size: 8}}"])
    with pytest.raises(ConfigError, match=r"peers.v.arch=timm:vit_tiny_patch16_224 cannot take views.local.size=8 "
                                          r"px views .*raise views.local.size"):
        memory_model(cfg, 1, Precision(torch.float32, False))

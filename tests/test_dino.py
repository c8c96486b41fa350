"""DINO against lightly's DINOProjectionHead and DINOLoss (a reference no one here wrote), in float64, loss and
gradients, over steps of the teacher-temperature warm-up and the centre's moving average; its momentum teacher; its
last layer frozen through the first epoch of a run; and DINO as a peer of DoGo and as DisCo's base method on crops."""
import math

import pytest
import torch

from dogo.core.registry import METHODS
from dogo.engine import config as config_mod
from dogo.engine.config import PeerConfig, resolve
from dogo.engine.ssl import losses
from dogo.engine.ssl.peers import build_peer
from dogo.models import Prototypes, projection_head

lightly_heads = pytest.importorskip("lightly.models.modules.heads", reason="lightly is a test dependency (dev)")
lightly_loss = pytest.importorskip("lightly.loss")
# lightly's DINOProjectionHead calls torch.nn.utils.weight_norm, which torch deprecates
pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")

IN, HIDDEN, BOTTLENECK, K = 12, 24, 8, 40


def _lightly_head_and_ours(norm_last_layer: bool, seed: int):
    torch.manual_seed(seed)
    theirs = lightly_heads.DINOProjectionHead(IN, HIDDEN, BOTTLENECK, K, norm_last_layer=norm_last_layer).double()
    mlp = projection_head(IN, HIDDEN, BOTTLENECK, layers=3, style="dino").double()
    prototypes = Prototypes(BOTTLENECK, K, norm_last_layer).double()
    linears = [m for m in theirs.layers if isinstance(m, torch.nn.Linear)]
    ours_linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for a, b in zip(ours_linears, linears, strict=True):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
        prototypes.weight_v.copy_(theirs.last_layer.weight_v)
        prototypes.weight_g.copy_(theirs.last_layer.weight_g)
    return theirs, mlp, prototypes


@pytest.mark.parametrize("norm_last_layer", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_dino_head_equals_lightlys_in_outputs_and_gradients(norm_last_layer, seed):
    theirs, mlp, prototypes = _lightly_head_and_ours(norm_last_layer, seed)
    with torch.no_grad():  # a last layer whose rows are not of unit norm, and a g that is not 1 when it trains
        theirs.last_layer.weight_v.mul_(torch.rand(K, 1, dtype=torch.float64) + 0.5)
        prototypes.weight_v.copy_(theirs.last_layer.weight_v)
        if not norm_last_layer:
            theirs.last_layer.weight_g.mul_(torch.rand(K, 1, dtype=torch.float64) + 0.5)
            prototypes.weight_g.copy_(theirs.last_layer.weight_g)
    x = torch.randn(6, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 10))
    ours_out, their_out = prototypes(mlp(x)), theirs(x)
    torch.testing.assert_close(ours_out, their_out, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(their_out)
    (ours_out * w).sum().backward()
    (their_out * w).sum().backward()
    theirs_linears = [m for m in theirs.layers if isinstance(m, torch.nn.Linear)]
    for a, b in zip([m for m in mlp if isinstance(m, torch.nn.Linear)], theirs_linears):
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.bias.grad, b.bias.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(prototypes.weight_v.grad, theirs.last_layer.weight_v.grad, rtol=1e-10, atol=1e-12)
    assert prototypes.weight_g.requires_grad == theirs.last_layer.weight_g.requires_grad == (not norm_last_layer)
    if not norm_last_layer:
        torch.testing.assert_close(prototypes.weight_g.grad, theirs.last_layer.weight_g.grad, rtol=1e-10, atol=1e-12)


def test_the_dino_heads_init_is_dinos():
    """Normal of std 0.02 (truncated at +-2, as DINO's trunc_normal_: in effect not at all) and zero biases in the
    MLP, no BatchNorm; prototypes with g = 1 and no gradient for it."""
    torch.manual_seed(0)
    mlp = projection_head(512, 2048, 256, layers=3, style="dino")
    weights = torch.cat([m.weight.flatten() for m in mlp if isinstance(m, torch.nn.Linear)])
    assert abs(weights.std().item() - 0.02) < 0.0005 and abs(weights.mean().item()) < 0.0005
    assert all(m.bias.abs().max() == 0 for m in mlp if isinstance(m, torch.nn.Linear))
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in mlp)
    p = Prototypes(256, 100)
    assert torch.equal(p.weight_g, torch.ones(100, 1)) and not p.weight_g.requires_grad


def _dino_state(seed, **settings):
    """A tiny DINO peer in float64 and its state, with `settings` for peers.p.dino."""
    cfg = config_mod.Config(objective=config_mod.ObjectiveConfig(name="dino"), peers={"p": PeerConfig(
        arch="resnet18", cifar_stem=True, head_hidden=16, head_out=BOTTLENECK)})
    for key, value in {"prototypes": K, **settings}.items():
        setattr(cfg.peers["p"].dino, key, value)
    resolve(cfg)
    peer_cfg = cfg.peers["p"]
    torch.manual_seed(seed)
    peer = build_peer(peer_cfg, 16).double()
    return peer_cfg, peer, METHODS.get("dino", "ssl").make_state(peer_cfg, peer, seed=0).double()


@pytest.mark.parametrize("seed", [0, 1])
def test_dino_loss_and_centre_equal_lightlys_dinoloss_over_the_warm_up(seed):
    """Four steps, one epoch each, through the teacher temperature's warm-up (0.04 -> 0.07 over 3 epochs, then
    0.07), 2 large + 3 local crops: our state's targets and dino_loss against lightly's DINOLoss given the same
    teacher scores and the epoch, loss and gradient in the student's scores, then the centre after each update.
    Under float64 as torch's default dtype: lightly makes its temperatures with torch.tensor and torch.linspace."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _dino_against_lightly(seed)
    finally:
        torch.set_default_dtype(default)


def _dino_against_lightly(seed):
    s = {"warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 3, "center_momentum": 0.8,
         "student_temp": 0.1}
    peer_cfg, peer, state = _dino_state(seed, **s)
    theirs = lightly_loss.DINOLoss(output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.07,
                                   warmup_teacher_temp_epochs=3, student_temp=0.1, center_momentum=0.8).double()
    g = torch.Generator().manual_seed(seed)
    b, total = 4, 4
    for step in range(1, total + 1):
        state.schedule(step, total, 1)
        large = torch.randn(2 * b, 3, 16, 16, dtype=torch.float64, generator=g)
        encoder = state.teacher.encoder
        with torch.no_grad():
            teacher_scores = encoder.predictor(encoder(large))
        targets = state.targets(large, 2)
        torch.testing.assert_close(targets[-1], teacher_scores, rtol=0, atol=0)
        student = [(torch.randn(b, K, dtype=torch.float64, generator=g) * 3).requires_grad_() for _ in range(5)]
        ours = losses.dino_loss(student, targets[:-1], peer_cfg.dino.student_temp)
        their = theirs(list(teacher_scores.chunk(2)), student, epoch=step - 1)
        torch.testing.assert_close(ours, their, rtol=1e-10, atol=1e-12)
        for a, c in zip(torch.autograd.grad(ours, student), torch.autograd.grad(their, student)):
            torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)
        state.after_step(peer, targets)
        assert state.center.dtype == torch.float64
        torch.testing.assert_close(state.center, theirs.center.reshape(1, K), rtol=1e-12, atol=1e-12)


def test_dinos_teacher_follows_the_cosine_momentum_with_its_prototypes():
    """teacher = m theta_t + (1 - m) theta_s for the backbone, head and prototypes, m from 0.996 to 1 (cosine)."""
    peer_cfg, peer, state = _dino_state(0)
    teacher = state.teacher.encoder
    assert teacher.predictor is not None and all(not p.requires_grad for p in teacher.parameters())
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    with torch.no_grad():
        for p in peer.parameters():
            p.add_(torch.randn_like(p))
    step, total, base = 30, 100, peer_cfg.dino.momentum
    m = 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2
    state.schedule(step, total, 10)
    state.after_step(peer, (torch.zeros(2, K, dtype=torch.float64),))
    online = dict(peer.named_parameters())
    assert any(n.startswith("predictor.") for n in online)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, m * before[n] + (1 - m) * online[n], rtol=1e-12, atol=1e-12)


def _config(tmp_path, objective, peers, *extra, steps=4):
    return config_mod.load(None, [
        "device=cpu", f"out_dir={tmp_path}", "seed=1", "data.backend=synthetic", "data.synthetic.images=8",
        "data.image_size=16", "data.batch_size=4", f"objective.name={objective}", f"peers={peers}",
        "views={global: {count: 2}, local: {count: 2, size: 8}}", f"schedule.max_steps={steps}",
        "schedule.warmup_epochs=0", "eval.knn_every_epochs=0", "log.tensorboard=off", "optim.name=sgd",
        "optim.lr=0.5", "optim.weight_decay=0.1", *extra])


DINO_PEER = "{arch: resnet18, head_hidden: 16, head_out: 8, ssl: dino, dino: {prototypes: 32}}"


def test_the_last_layer_takes_no_update_in_the_first_epoch_and_trains_after(tmp_path):
    """8 images of 4: two steps per epoch. Through epoch 0 the prototypes keep their weights and the optimiser keeps
    no state for them (their gradient is dropped, as DINO's cancel_gradients_last_layer, so weight decay and momentum
    leave them too); every other parameter moves; from epoch 1 they train."""
    from dogo.engine.run.trainer import Trainer
    trainer = Trainer(_config(tmp_path, "dino", f"{{p: {DINO_PEER}}}"))
    last = trainer.model.peers["p"].predictor.weight_v
    start = last.detach().clone()
    batches = iter(trainer.loader)
    for _ in range(2):
        before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        terms = trainer.step(next(batches))
        trainer.pos.step += 1
        assert torch.isfinite(terms["p/dino"])
        assert torch.equal(last, start) and last not in trainer.optimizer.state
        moved = [k for k, v in trainer.model.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
        assert len(moved) == sum(1 for p in trainer.model.parameters() if p.requires_grad) - 1
    batches = iter(trainer.loader)
    trainer.step(next(batches))
    assert not torch.equal(last, start)


@pytest.mark.parametrize("objective", ["dogo", "disco", "disco_prototypes"])
def test_dino_as_a_dogo_peer_and_as_discos_base_method_on_crops(tmp_path, objective):
    """DoGo: a DINO peer beside a SimCLR one, the KL on DINO's bottleneck embeddings; DisCo: a DINO student under a
    frozen teacher of the same embedding size, or distilling a DINO teacher's prototypes. The run resumes
    bit-identically (the centres and the momentum teacher in the checkpoint)."""
    from dogo.engine.run.trainer import Trainer
    from dogo.models import Peer
    extra = []
    if objective == "dogo":
        peers = f"{{d: {DINO_PEER}, s: {{arch: resnet18, head_hidden: 16, head_out: 8}}}}"
    elif objective == "disco_prototypes":
        peers = f"{{d: {DINO_PEER}}}"
        extra = [f"teacher.checkpoint={_dino_teacher_run(tmp_path)}", "objective.distill_target=prototypes"]
        objective = "disco"
    else:
        peers = f"{{d: {DINO_PEER}}}"
        torch.manual_seed(5)
        t = Peer("resnet18", True, 16, 8)
        torch.save(t.backbone.state_dict(), tmp_path / "bb.pt")
        torch.save(t.head.state_dict(), tmp_path / "head.pt")
        extra = [f"teacher.backbone={tmp_path / 'bb.pt'}", f"teacher.head={tmp_path / 'head.pt'}",
                 "teacher.arch=resnet18", "teacher.cifar_stem=true"]
    from dogo.core import checkpoint_files
    from dogo.engine.run.trainer import train

    def run(folder):
        return _config(tmp_path / folder, objective, peers, *extra, "checkpoint.every_steps=2", "log.progress=off")

    train(run("straight"))
    trainer = Trainer(run("resumed"))
    real = trainer._after_step

    def stop_after_two(batch, log, stop, result):
        done = real(batch, log, stop, result)
        if trainer.pos.step == 2:
            raise KeyboardInterrupt  # a kill right after the step-2 checkpoint, inside the frozen epoch
        return done

    trainer._after_step = stop_after_two
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    train(run("resumed"))
    a = checkpoint_files.load(checkpoint_files.latest(run("straight").run_dir))
    b = checkpoint_files.load(checkpoint_files.latest(run("resumed").run_dir))
    assert a["position"] == b["position"] and a["position"]["step"] == 4
    for name in a["peers"]:
        for key, t in a["peers"][name].items():
            assert torch.equal(t, b["peers"][name][key]), f"{name}.{key} differs after the resume"
    states_a, states_b = a["targets"]["method_states"], b["targets"]["method_states"]
    assert states_a.keys() == states_b.keys() and "d.center" in states_a and states_a["d.center"].abs().sum() > 0
    assert all(torch.equal(t, states_b[k]) for k, t in states_a.items())
    centre = a["targets"]["teacher_center"]
    assert (centre is None) == ("objective.distill_target=prototypes" not in extra)
    assert centre is None or (torch.equal(centre, b["targets"]["teacher_center"]) and centre.abs().sum() > 0)


def test_the_prototype_distillation_written_out():
    """DisCo's prototype target over 2 large + 3 local crops: each large crop's cross-entropy to the teacher's same
    crop, each local crop's to every large crop's at weight 1/2, each a mean over the rows."""
    g = torch.Generator().manual_seed(3)
    b, k, temp = 4, 7, 0.1
    student = [torch.randn(b, k, dtype=torch.float64, generator=g) for _ in range(5)]
    teacher = [torch.softmax(torch.randn(b, k, dtype=torch.float64, generator=g), dim=1) for _ in range(2)]

    def ce(s, t):
        total = 0.0
        for row_s, row_t in zip(s.tolist(), t.tolist()):
            z = [x / temp for x in row_s]
            log_norm = math.log(sum(math.exp(x) for x in z))
            total += -sum(p * (x - log_norm) for p, x in zip(row_t, z))
        return total / len(s)

    want = ce(student[0], teacher[0]) + ce(student[1], teacher[1]) + sum(
        ce(student[v], teacher[t]) for v in range(2, 5) for t in range(2)) / 2
    assert losses.distill_cross_entropy(student, teacher, temp).item() == pytest.approx(want, rel=1e-12)


def _dino_teacher_run(tmp_path):
    """A DINO run of 2 steps: the teacher a DisCo student distils its prototypes from."""
    from dogo.engine.run.trainer import train
    train(_config(tmp_path / "teacher", "dino", f"{{t: {DINO_PEER}}}", steps=2))
    return tmp_path / "teacher" / "run"


def test_a_dino_student_distils_a_dino_teachers_prototypes(tmp_path):
    """The students' target is softmax((scores - centre) / dino.teacher_temp) of the teacher's prototype scores of
    the large crops; the centre follows the scores' mean after each step (momentum dino.center_momentum)."""
    from dogo.engine.run.trainer import Trainer
    teacher_run = _dino_teacher_run(tmp_path)
    trainer = Trainer(_config(tmp_path, "disco", f"{{d: {DINO_PEER}}}", f"teacher.checkpoint={teacher_run}",
                              "objective.distill_target=prototypes", "peers.d.dino.teacher_temp=0.05",
                              "peers.d.dino.center_momentum=0.5"))
    makers = trainer.targets
    seen = []
    real = makers._teacher_targets
    makers._teacher_targets = lambda large, crops: seen.append((large.clone(), real(large, crops))) or seen[-1][1]
    batches = iter(trainer.loader)
    for step in range(2):
        centre = makers.teacher_center.clone()
        terms = trainer.step(next(batches))
        large, targets = seen[-1]
        scores = makers.teacher.peer.predictor(makers.teacher.peer(large)).detach()
        want = torch.softmax((scores - centre) / 0.05, dim=1)
        torch.testing.assert_close(torch.cat(targets[:-1]), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(makers.teacher_center, 0.5 * centre + 0.5 * scores.mean(0, keepdim=True))
        assert torch.isfinite(terms["d/distill"]) and torch.isfinite(terms["d/dino"])


@pytest.mark.parametrize("student, extra, message", [
    (DINO_PEER, ["teacher.peer=s"], "needs a DINO teacher"),
    ("{arch: resnet18, head_hidden: 16, head_out: 8}", [], "needs ssl=dino and dino.prototypes=32"),
    (DINO_PEER.replace("prototypes: 32", "prototypes: 16"), [], "dino.prototypes=32 (it has ssl=dino, "
                                                                 "dino.prototypes=16)"),
])
def test_the_prototype_target_names_what_it_needs(tmp_path, student, extra, message):
    from dogo.core.errors import ConfigError
    from dogo.engine.run.trainer import Trainer, train
    teacher_run = _dino_teacher_run(tmp_path)
    if extra:  # a SimCLR teacher: no prototypes
        train(_config(tmp_path / "simclr", "simclr", "{s: {arch: resnet18, head_hidden: 16, head_out: 8}}", steps=1))
        teacher_run = tmp_path / "simclr" / "run"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Trainer(_config(tmp_path / "s", "disco", f"{{d: {student}}}", f"teacher.checkpoint={teacher_run}",
                        "objective.distill_target=prototypes", *extra))


def test_the_prototype_target_outside_disco_is_refused(tmp_path):
    from dogo.core.errors import ConfigError
    with pytest.raises(ConfigError, match="objective.distill_target=prototypes is DisCo's"):
        _config(tmp_path, "dino", f"{{d: {DINO_PEER}}}", "objective.distill_target=prototypes")


def test_dino_on_a_timm_vit_trains_every_parameter_after_the_frozen_epoch(tmp_path):
    """DINO's own backbone family: a timm ViT (2 blocks, 4 px patches) with the DINO head and prototypes, on crops."""
    pytest.importorskip("timm", reason="the timm extra")
    from dogo.engine.run.trainer import Trainer
    vit = ("{arch: 'timm:vit_tiny_patch16_224', arch_args: {patch_size: 4, depth: 2}, head_hidden: 16, head_out: 8, "
           "ssl: dino, dino: {prototypes: 32, freeze_last_layer_epochs: 0}}")
    trainer = Trainer(_config(tmp_path, "dino", f"{{v: {vit}}}", "precision.channels_last=off"))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    terms = trainer.step(next(iter(trainer.loader)))
    assert torch.isfinite(terms["v/dino"])
    unchanged = [k for k, v in trainer.model.named_parameters() if v.requires_grad and torch.equal(v, before[k])]
    assert not unchanged, unchanged[:5]

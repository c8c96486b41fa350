"""Schedule and optimisers."""

import pytest
import torch

from dogo.engine.config import load
from dogo.engine.run.optim import LARS, build_optimizer, lr_factor, param_groups
from dogo.models import Peer


def test_warmup_then_cosine():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm) for s in range(total + 1)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[100] == pytest.approx(0.0, abs=1e-12)
    assert f[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(100, 100, 0, final_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        lr_factor(101, 100, 10)


def test_lars_matches_a_plain_reference():
    torch.manual_seed(0)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    opt = LARS([{"params": [w], "lars": True, "weight_decay": 0.1},
                {"params": [b], "lars": False, "weight_decay": 0.0}], lr=0.5, momentum=0.9, trust_coefficient=0.01)
    w_ref, b_ref = w.detach().clone(), b.detach().clone()
    mw, mb = torch.zeros_like(w_ref), torch.zeros_like(b_ref)
    for step in range(3):
        gw, gb = torch.randn_like(w_ref), torch.randn_like(b_ref)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        d = gw + 0.1 * w_ref
        mw = 0.9 * mw + 0.01 * w_ref.norm() / d.norm() * d
        mb = 0.9 * mb + gb
        w_ref -= 0.5 * mw
        b_ref -= 0.5 * mb
        torch.testing.assert_close(w.detach(), w_ref)
        torch.testing.assert_close(b.detach(), b_ref)


def test_groups_scale_lr_and_skip_decay_on_biases_and_norms():
    cfg = load(None, ["objective.name=simclr", "optim.lr=0.3", "optim.weight_decay=0.01", "peers.r18.lr=0.6"])
    peers = {"r18": Peer("resnet18", False, 32, 8)}
    groups = param_groups(peers, cfg, global_batch=512)
    decay, plain = groups
    assert decay["lr"] == pytest.approx(1.2) and decay["weight_decay"] == 0.01
    assert plain["weight_decay"] == 0.0 and not plain["lars"]
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in plain["params"])
    n = sum(1 for _ in peers["r18"].parameters())
    assert len(decay["params"]) + len(plain["params"]) == n


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_each_optimiser_steps(name):
    cfg = load(None, ["objective.name=simclr", f"optim.name={name}"])
    peer = Peer("resnet18", True, 16, 8)
    opt = build_optimizer({"r18": peer}, cfg, 256, torch.device("cpu"))
    before = [p.detach().clone() for p in peer.parameters()]
    peer(torch.randn(4, 3, 8, 8)).square().sum().backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, peer.parameters()))


def test_lars_under_a_grad_scaler_unscales_and_skips_inf_steps_on_the_device():
    """fp16's GradScaler hands LARS grad_scale and found_inf: the update equals the unscaled one, and a step whose
    gradients hold an inf changes neither weights nor momentum buffers (without the scaler reading found_inf)."""
    torch.manual_seed(0)
    w0 = torch.randn(5, 4)
    def make():
        w = torch.nn.Parameter(w0.clone())
        return w, LARS([{"params": [w], "lars": True, "weight_decay": 0.1}], lr=0.5, trust_coefficient=0.01)
    x = torch.randn(3, 5)
    plain_w, plain = make()
    (x @ plain_w).square().sum().backward()
    plain.step()
    w, opt = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((x @ w).square().sum()).backward()
    scaler.step(opt)
    scaler.update()
    torch.testing.assert_close(w.detach(), plain_w.detach(), rtol=1e-5, atol=1e-6)
    before_w, before_buf = w.detach().clone(), opt.state[w]["momentum_buffer"].clone()
    opt.zero_grad()
    scaler.scale((x @ w).square().sum() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w.detach(), before_w) and torch.equal(opt.state[w]["momentum_buffer"], before_buf)
    assert scaler.get_scale() == 512.0  # the skipped step halved the scale, as for any optimiser


def test_lars_over_many_tensors_with_zero_norms_matches_the_reference():
    """Trust ratios from one stacked vector equal the per-tensor rule, 1 where a weight or gradient norm is 0."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 3), (7,), (2, 2, 3), (5, 5), (3, 1)]
    ws = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ws[1].zero_()  # a zero weight: trust 1
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = LARS([{"params": params, "lars": True, "weight_decay": 0.0}], lr=0.1, momentum=0.9,
               trust_coefficient=0.02)
    bufs = [torch.zeros_like(w) for w in ws]
    for _ in range(2):
        grads = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in ws]
        grads[3].zero_()  # a zero gradient: trust 1
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, (w, g) in enumerate(zip(ws, grads)):
            wn, gn = w.norm(), g.norm()
            trust = 0.02 * wn / gn if wn > 0 and gn > 0 else 1.0
            bufs[i] = 0.9 * bufs[i] + trust * g
            w -= 0.1 * bufs[i]
        for p, w in zip(params, ws):
            torch.testing.assert_close(p.detach(), w)


def test_lars_step_of_the_imagenet_dogo_config_dispatches_at_most_44_ops():
    """229 weight tensors in 4 groups: the step's dispatches do not grow with the tensor count (11 per group: the
    lr multiplies the update in an op of its own, so that it may be a device tensor under CUDA graphs)."""
    from dogo.benchmarks.train_step import OpCounter
    cfg = load("configs/imagenet_r18_r50.yaml", [])
    peers = {n: Peer(p.arch, p.cifar_stem, p.head_hidden, p.head_out) for n, p in cfg.peers.items()}
    opt = build_optimizer(peers, cfg, cfg.data.batch_size, torch.device("cpu"))
    for peer in peers.values():
        for p in peer.parameters():
            p.grad = torch.randn_like(p)
    opt.step()  # creates the momentum buffers
    with OpCounter() as counter:
        opt.step()
    assert cfg.optim.name == "lars" and len(counter.ops) <= 44, counter.ops

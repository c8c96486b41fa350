"""Any timm model as a peer, a student or a teacher (peers.NAME.arch: timm:<name>): a ViT, a ConvNeXt and a ResNet at
tiny sizes on the CPU: forward and backward with a gradient for every parameter, the optimiser's no-decay groups,
resume bit for bit, the export round trip through timm, a DisCo teacher from timm files, and the errors."""
import pytest
import torch

from dogo.engine import config as config_mod
from dogo.core.errors import ConfigError
from tests.helpers import dogo

timm = pytest.importorskip("timm", reason="the timm extra")

MODELS = {  # name -> arch_args, at 32 px views
    "vit_tiny_patch16_224": {"patch_size": 4, "depth": 2},
    "convnext_atto": {},
    "resnet18": {},
}


def _config(tmp_path, name, args, objective="simclr", **extra):
    raw = {"name": "t", "out_dir": str(tmp_path), "seed": 2, "device": "cpu",
           "data": {"backend": "synthetic", "synthetic": {"images": 32}, "image_size": 32, "batch_size": 8,
                    "workers": 0},
           "peers": {"p": {"arch": f"timm:{name}", "arch_args": args, "head_hidden": 32, "head_out": 16}},
           "objective": {"name": objective}, "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
           "schedule": {"max_steps": 4, "warmup_epochs": 0, "final_lr_ratio": 1.0}, "eval": {"knn_every_epochs": 0},
           "checkpoint": {"every_steps": 2},
           "log": {"progress": "off", "tensorboard": "off", "every": 1}, **extra}
    return raw


@pytest.mark.parametrize("name", list(MODELS))
def test_a_timm_peer_trains_every_parameter(name, tmp_path):
    from dogo.engine.run.trainer import Trainer
    trainer = Trainer(config_mod.from_dict(_config(tmp_path, name, MODELS[name])))
    peer = trainer.model.peers["p"]
    assert peer.num_features == peer.backbone.num_features and peer.head[0].in_features == peer.num_features
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    batches = iter(trainer.loader)
    for _ in range(2):  # two: timm's ResNets start each block's last BN at zero (zero_init_last)
        assert torch.isfinite(trainer.step(next(batches))["loss"])
    unchanged = [k for k, v in trainer.model.named_parameters() if torch.equal(v, before[k])]
    assert not unchanged, f"{name}: parameters without an update: {unchanged[:5]}"


def test_a_vits_position_embedding_and_class_token_take_no_weight_decay(tmp_path):
    from dogo.engine.run.trainer import Trainer
    trainer = Trainer(config_mod.from_dict(_config(tmp_path, "vit_tiny_patch16_224", MODELS["vit_tiny_patch16_224"])))
    names = {id(p): n for n, p in trainer.model.peers["p"].named_parameters()}
    plain = {names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decayed = {names[id(p)] for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {"backbone.pos_embed", "backbone.cls_token"} <= plain
    assert "backbone.blocks.0.attn.qkv.weight" in decayed and not any("norm" in n for n in decayed)


def test_a_timm_peer_resumes_bit_for_bit(tmp_path):
    """4 steps straight, against 2 steps, a new process-like start from the step-2 checkpoint, and 2 more."""
    from dogo.engine.run.trainer import train
    name, args = "vit_tiny_patch16_224", MODELS["vit_tiny_patch16_224"]
    train(config_mod.from_dict(_config(tmp_path / "straight", name, args)))
    train(config_mod.from_dict(_config(tmp_path / "resumed", name, args, schedule={
        "max_steps": 2, "warmup_epochs": 0, "final_lr_ratio": 1.0})))  # a constant lr: the same first 2 steps
    train(config_mod.from_dict(_config(tmp_path / "resumed", name, args)))
    from dogo.core import checkpoint_files
    a = checkpoint_files.load(checkpoint_files.latest(tmp_path / "straight" / "t"))
    b = checkpoint_files.load(checkpoint_files.latest(tmp_path / "resumed" / "t"))
    assert a["position"] == b["position"] and a["position"]["step"] == 4
    for k, v in a["peers"]["p"].items():
        assert torch.equal(v, b["peers"]["p"][k]), k


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto"])
def test_export_format_timm_loads_back_into_timm(name, tmp_path, capsys):
    from dogo.engine.run.trainer import train
    train(config_mod.from_dict(_config(tmp_path, name, MODELS[name], schedule={"max_steps": 1})))
    out = tmp_path / "backbone.pt"
    assert dogo("export", tmp_path / "t", "--peer", "p", "--format", "timm", out) == 0
    assert "timm.create_model" in capsys.readouterr().out
    sizes = {"img_size": 32} if name.startswith("vit") else {}
    model = timm.create_model(name, num_classes=0, **sizes, **MODELS[name])
    model.load_state_dict(torch.load(out), strict=True)
    from dogo.core import checkpoint_files
    state = checkpoint_files.load(checkpoint_files.latest(tmp_path / "t"))["peers"]["p"]
    assert all(torch.equal(v, state[f"backbone.{k}"]) for k, v in model.state_dict().items())


def test_a_torchvision_resnet_exports_for_timms_resnet(tmp_path):
    from dogo.engine.run.trainer import train
    raw = _config(tmp_path, "resnet18", {}, schedule={"max_steps": 1})
    raw["peers"]["p"]["arch"] = "resnet18"
    raw["peers"]["p"]["arch_args"] = {}
    train(config_mod.from_dict(raw))
    out = tmp_path / "backbone.pt"
    assert dogo("export", tmp_path / "t", "--peer", "p", "--format", "timm", out) == 0
    timm.create_model("resnet18", num_classes=0).load_state_dict(torch.load(out), strict=True)


def test_disco_from_a_timm_teachers_files(tmp_path):
    """A timm ViT teacher from plain files (its full timm state_dict, classifier `head.` keys dropped; the head file
    from dogo export --head): its keys do not clash with dogo's projection head."""
    from dogo.engine.run.trainer import Trainer
    from dogo.models import Peer
    name, args = "vit_tiny_patch16_224", MODELS["vit_tiny_patch16_224"]
    torch.manual_seed(0)
    full = timm.create_model(name, num_classes=10, img_size=32, **args)  # with its classifier, as timm saves it
    teacher = Peer(f"timm:{name}", False, 32, 16, image_size=32, arch_args=args)
    teacher.backbone.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("head.")})
    torch.save(full.state_dict(), tmp_path / "vit.pt")
    torch.save(teacher.head.state_dict(), tmp_path / "head.pt")
    raw = _config(tmp_path, "resnet18", {}, objective="disco",
                  teacher={"backbone": str(tmp_path / "vit.pt"), "head": str(tmp_path / "head.pt"),
                           "arch": f"timm:{name}", "arch_args": args})
    raw["peers"]["p"].update(arch="resnet18", arch_args={}, ssl="simclr")
    trainer = Trainer(config_mod.from_dict(raw))
    loaded = trainer.targets.teacher.peer
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert torch.isfinite(trainer.step(next(iter(trainer.loader)))["loss"])


@pytest.mark.parametrize("overrides, match", [
    (["peers.r18.arch=timm:vit_tiy_patch16_224"], r"'vit_tiy_patch16_224' is not a timm model; did you mean "
                                                  r"vit_tiny_patch16_224"),
    (["peers.r18.arch=timm:convnext_atto", "peers.r18.cifar_stem=true"], "timm:convnext_atto takes no CIFAR stem"),
    (["peers.r18.arch_args={depth: 2}"], "arch_args are timm.create_model's arguments; resnet18 is a torchvision"),
])
def test_timm_errors_are_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_mod.load(None, ["objective.name=simclr", *overrides])


def test_timm_missing_is_a_clear_error(monkeypatch):
    import builtins
    from dogo.models import backbones
    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda n, *a, **k: (_ for _ in ()).throw(ImportError(n)) if n.startswith("timm")
                        else real(n, *a, **k))
    backbones._timm_spec.cache_clear()
    try:
        with pytest.raises(ConfigError, match="needs the timm package: the timm extra"):
            backbones.BACKBONES.get("timm:resnet18", "peers.r18.arch")
    finally:
        backbones._timm_spec.cache_clear()

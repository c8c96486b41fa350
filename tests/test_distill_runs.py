"""DisCo end to end at a tiny size: a teacher from a dogo run or from exported files, frozen bit for bit through
training, the student exported into torchvision; and DoGo with mixed objectives under a 2-process torchrun."""
import json

import pytest
import torch
import torchvision

from dogo.core import checkpoint_files
from dogo.engine import config as config_mod
from dogo.engine.ssl.teacher import state_fingerprint
from tests.helpers import dogo, run_cli, tiny_config, write_config

STUDENT = {"s": {"arch": "resnet18", "head_hidden": 64, "head_out": 16, "tau": 0.5}}


@pytest.fixture(scope="module")
def teacher_run(shapes, tmp_path_factory):
    """A tiny DoGo run whose peer 'b' teaches."""
    root = tmp_path_factory.mktemp("teacher")
    cfg = write_config(root / "t.yaml", tiny_config(shapes, root / "runs", schedule={"max_steps": 2}))
    assert dogo("train", cfg) == 0
    return root / "runs" / "t"


def _disco_config(shapes, out_dir, **teacher):
    cfg = tiny_config(shapes, out_dir, name="disco", objective={"name": "disco", "distill_weight": 2.0},
                      teacher=teacher, schedule={"max_steps": 3})
    cfg["peers"] = STUDENT
    return cfg


def test_teacher_stays_bit_identical_through_training(shapes, teacher_run, tmp_path):
    from dogo.engine.run.trainer import Trainer
    cfg = config_mod.from_dict(_disco_config(shapes, tmp_path, checkpoint=str(teacher_run), peer="b"))
    trainer = Trainer(cfg)
    teacher = trainer.targets.teacher
    saved = checkpoint_files.load(checkpoint_files.latest(teacher_run))["peers"]["b"]
    before = {k: v.clone() for k, v in teacher.peer.state_dict().items()}
    for k, v in before.items():
        assert torch.equal(v, saved[k]), f"teacher {k} differs from its checkpoint"
    assert not any(p.requires_grad for p in teacher.parameters())
    trainer.model.train()
    trainer.targets.train()  # whatever the trainer asks, the teacher's BN stays in eval
    assert not teacher.training and not any(m.training for m in teacher.modules())
    student_before = [p.clone() for p in trainer.model.parameters()]
    for step, batch in zip(range(3), trainer.loader):
        terms = trainer.step(batch)
        assert torch.isfinite(terms["s/distill"]) and terms["s/distill"] > 0
    for k, v in teacher.peer.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher {k} changed during training"
    assert any(not torch.equal(a, b) for a, b in zip(student_before, trainer.model.parameters()))


@pytest.mark.slow
def test_disco_from_a_run_and_from_exported_files(shapes, teacher_run, tmp_path):
    assert dogo("train", str(write_config(tmp_path / "d.yaml", _disco_config(
        shapes, tmp_path / "ckpt", checkpoint=str(teacher_run), peer="b")))) == 0
    state = checkpoint_files.load(checkpoint_files.latest(tmp_path / "ckpt" / "disco"))
    teacher_state = checkpoint_files.load(checkpoint_files.latest(teacher_run))["peers"]["b"]
    assert state["targets"]["teacher_sha256"] == state_fingerprint(teacher_state)
    lines = [json.loads(l) for l in (tmp_path / "ckpt" / "disco" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "s/distill" in l] == [1, 2, 3]

    # the same teacher as plain files: backbone in torchvision's format plus the head
    assert dogo("export", teacher_run, "--peer", "b", tmp_path / "bb.pt", "--head", tmp_path / "head.pt") == 0
    files = _disco_config(shapes, tmp_path / "files", backbone=str(tmp_path / "bb.pt"),
                          head=str(tmp_path / "head.pt"), arch="resnet18")
    assert dogo("train", str(write_config(tmp_path / "f.yaml", files))) == 0
    by_files = checkpoint_files.load(checkpoint_files.latest(tmp_path / "files" / "disco"))
    assert by_files["targets"]["teacher_sha256"] == state["targets"]["teacher_sha256"]
    # same teacher, same seed, same data: the same student
    for k, v in state["peers"]["s"].items():
        assert torch.equal(v, by_files["peers"]["s"][k]), k

    # the student's backbone loads into torchvision
    assert dogo("export", str(tmp_path / "ckpt" / "disco"), "--peer", "s", str(tmp_path / "student.pt")) == 0
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load(tmp_path / "student.pt"), strict=True)


@pytest.fixture(scope="module")
def exported(teacher_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    assert dogo("export", teacher_run, "--peer", "a", out / "bb.pt", "--head", out / "head.pt") == 0
    return out


@pytest.mark.parametrize("teacher,message", [
    ({"checkpoint": "RUN", "peer": ""}, "holds peers a, b; name one with teacher.peer=NAME"),
    ({"checkpoint": "RUN", "peer": "c"}, "there is no 'c'"),
    ({"checkpoint": "/no/such/run"}, "does not exist"),
    ({"backbone": "BB", "head": "HEAD", "arch": "resnet50"}, "does not match the architecture"),
    ({"backbone": "HEAD", "head": "HEAD", "arch": "resnet18"}, "missing keys: conv1.weight"),
    ({"backbone": "BB", "head": "BB", "arch": "resnet18"}, "is not a projection head"),
    ({"backbone": "BB", "head": "HEAD", "arch": "resnet19"}, "teacher.arch: 'resnet19' is not a registered backbone; did you mean 'resnet18'"),
])
def test_bad_teacher_is_a_clear_error(teacher_run, exported, teacher, message):
    from dogo.core.errors import ConfigError
    from dogo.engine.config import TeacherConfig
    from dogo.engine.ssl.teacher import load_teacher
    subst = {"RUN": str(teacher_run), "BB": str(exported / "bb.pt"), "HEAD": str(exported / "head.pt")}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_teacher(TeacherConfig(**{k: subst.get(v, v) for k, v in teacher.items()}), image_size=32)


def test_embedding_size_mismatch_is_a_config_error(shapes, teacher_run, tmp_path):
    from dogo.core.errors import ConfigError
    from dogo.engine.ssl.targets import TargetMakers
    from dogo.engine.run.trainer import build_peers
    cfg = _disco_config(shapes, tmp_path / "runs", checkpoint=str(teacher_run), peer="a")
    cfg["peers"]["s"] = {**STUDENT["s"], "head_out": 8}
    cfg = config_mod.from_dict(cfg)
    with pytest.raises(ConfigError, match=r"peers\.s\.head_out=8 but the teacher .* set peers\.s\.head_out=16"):
        TargetMakers(cfg, build_peers(cfg).peers)


@pytest.mark.slow
def test_mixed_objective_dogo_under_two_gloo_ranks(shapes, tmp_path):
    from tests.test_runs import MIXED_PEERS
    cfg = tiny_config(shapes, tmp_path / "runs", schedule={"max_steps": 2}, distributed={"sync_bn": True},
                      **MIXED_PEERS)
    run_cli("train", str(write_config(tmp_path / "c.yaml", cfg)), torchrun_procs=2)
    state = checkpoint_files.load(checkpoint_files.latest(tmp_path / "runs" / "t"))
    enc = state["targets"]["method_states"]
    # 2 steps x the global batch of 8 view-2 keys (MoCo's own form), from both ranks
    assert enc["a.queue._extra_state"] == {"ptr": 16}
    assert enc["a.queue.queue"].norm(dim=1).sub(1).abs().max() < 1e-5  # written keys and the random start: unit rows

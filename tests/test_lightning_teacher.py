"""Issue 47: a DisCo teacher from the Lightning checkpoints solo-learn and lightly users already have. Each checkpoint
here is written by pytorch-lightning's Trainer after two training steps (BatchNorm statistics and weights moved)
from a LightningModule built as the library builds its own: lightly's real projection heads; solo-learn's module
layout as solo/methods/base.py, simclr.py and byol.py (commit 9187ea3) build it, since solo-learn itself cannot be
installed here (its one PyPI release, 1.0.2, pins torch 1.9.1 and pytorch-lightning 1.4.7). The teacher must compute
exactly what the module's backbone and projector compute."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

pl = pytest.importorskip("pytorch_lightning")
heads = pytest.importorskip("lightly.models.modules.heads")

from dogo.core.errors import ConfigError  # noqa: E402
from dogo.engine.config import TeacherConfig  # noqa: E402
from dogo.engine.ssl.teacher import load_teacher  # noqa: E402
from tests.helpers import dogo, tiny_config, write_config  # noqa: E402

# Lightning 2.6 on torch 2.14 warns of its own use of torch's pytree
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
              pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")]  # lightly's DINO head


class TwoViewModule(pl.LightningModule):
    """Trains on two noisy copies of random images with SimCLR's loss; `embed` is backbone then projector."""

    def training_step(self, batch, _):
        x = batch[0]
        z = nn.functional.normalize(torch.cat([self.embed(x + 0.1 * torch.randn_like(x)),
                                               self.embed(x + 0.1 * torch.randn_like(x))]), dim=1)
        n = x.shape[0]
        logits = (z @ z.T / 0.5).fill_diagonal_(float("-inf"))
        return nn.functional.cross_entropy(logits, torch.arange(2 * n).roll(n))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class LightlyModule(TwoViewModule):
    """As lightly's examples: a torchvision ResNet-18 without its classifier (or its children but fc in an
    nn.Sequential), one of lightly's projection heads, an online classifier beside them. cifar: the user's own CIFAR
    stem (lightly has none), a 3x3 first conv padded 1 and no max-pool. hparams: save_hyperparameters() of what
    an argparse parser gives."""

    def __init__(self, head: str, sequential: bool, cifar: bool = False, hparams=None):
        super().__init__()
        if hparams is not None:
            self.save_hyperparameters(hparams)
        resnet = torchvision.models.resnet18()
        if cifar:
            resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            resnet.maxpool = nn.Identity()
        if sequential:
            self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        else:
            resnet.fc = nn.Identity()
            self.backbone = resnet
        self.projection_head = {"simclr": lambda: heads.SimCLRProjectionHead(512, 64, 16),
                                "byol": lambda: heads.BYOLProjectionHead(512, 64, 16),
                                "simsiam": lambda: heads.SimSiamProjectionHead(512, 64, 16),
                                "vicreg": lambda: heads.VICRegProjectionHead(512, 64, 32, num_layers=3),
                                "msn": lambda: heads.MSNProjectionHead(512, 64, 16),
                                "dino": lambda: heads.DINOProjectionHead(512, 64, 16, 32)}[head]()
        self.online_classifier = nn.Linear(512, 10)

    def embed(self, x):
        return self.projection_head(self.backbone(x).flatten(start_dim=1))


class SoloModule(TwoViewModule):
    """As solo-learn's BaseMethod: a torchvision ResNet-18 with fc = Identity, for CIFAR a 3x3 stride-1 first conv
    with padding 2 and no max-pool; SimCLR's projector (Linear-ReLU-Linear) or BYOL's (Linear-BN-ReLU-Linear) with its
    momentum copies and predictor; the online classifier. backbone_name="encoder": solo-learn 1.0.2's name."""

    def __init__(self, method: str, cifar: bool, backbone_name: str = "backbone"):
        super().__init__()
        backbone = torchvision.models.resnet18()
        backbone.fc = nn.Identity()
        if cifar:
            backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
            backbone.maxpool = nn.Identity()
        self.backbone_name = backbone_name
        setattr(self, backbone_name, backbone)
        self.classifier = nn.Linear(512, 10)
        if method == "simclr":
            self.projector = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 16))
        else:
            self.projector = nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
            self.momentum_backbone = copy.deepcopy(backbone)
            self.momentum_projector = copy.deepcopy(self.projector)
            self.predictor = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))

    def embed(self, x):
        return self.projector(getattr(self, self.backbone_name)(x))


def _written_by_lightning(module: pl.LightningModule, path) -> pl.LightningModule:
    """Two SGD steps with Lightning's Trainer on CPU (its ModelCheckpoint callback on, whose state the file then
    carries too), then its checkpoint at `path`."""
    torch.manual_seed(0)
    images = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=path.parent)
    trainer.fit(module, torch.utils.data.DataLoader(images, batch_size=8))
    trainer.save_checkpoint(path)
    return module.eval()


def _assert_teacher_computes(module, path, arch="resnet18", **teacher):
    teacher = load_teacher(TeacherConfig(checkpoint=str(path), arch=arch, **teacher), image_size=32)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = module.embed(x)
    torch.testing.assert_close(teacher(x), expected, rtol=0, atol=0)
    assert teacher.embedding_dim == expected.shape[1]
    return teacher


@pytest.mark.parametrize("head, sequential", [("simclr", False), ("simclr", True), ("byol", True),
                                              ("simsiam", False), ("vicreg", True)])
def test_a_lightly_checkpoint_teaches_what_its_module_computes(tmp_path, head, sequential):
    module = _written_by_lightning(LightlyModule(head, sequential), tmp_path / "lightly.ckpt")
    _assert_teacher_computes(module, tmp_path / "lightly.ckpt")


def test_a_gelu_head_takes_its_activation_from_the_config(tmp_path):
    """lightly's MSN head (Linear-BN-GELU): exact with teacher.head_activation=gelu; read as ReLU it differs, which
    is why the key exists (a state_dict does not record its activations)."""
    module = _written_by_lightning(LightlyModule("msn", sequential=False), tmp_path / "msn.ckpt")
    _assert_teacher_computes(module, tmp_path / "msn.ckpt", head_activation="gelu")
    relu = load_teacher(TeacherConfig(checkpoint=str(tmp_path / "msn.ckpt"), arch="resnet18"), image_size=32)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(relu(x), module.embed(x))


def test_a_lightly_cifar_stem_and_argparse_hyperparameters(tmp_path):
    """The user's CIFAR stem in lightly's nn.Sequential form (found at child 0, padded 1), in a checkpoint that
    carries hyperparameters saved from an argparse.Namespace (a weights-only load takes that one class)."""
    import argparse
    module = LightlyModule("simclr", sequential=True, cifar=True, hparams=argparse.Namespace(lr=0.05, epochs=2))
    module = _written_by_lightning(module, tmp_path / "cifar.ckpt")
    assert isinstance(torch.load(tmp_path / "cifar.ckpt", weights_only=False)["hyper_parameters"], dict)
    teacher = _assert_teacher_computes(module, tmp_path / "cifar.ckpt")
    conv1 = teacher.peer.backbone.conv1
    assert (conv1.kernel_size, conv1.padding) == ((3, 3), (1, 1))


def test_a_lightly_dino_head_is_refused(tmp_path):
    _written_by_lightning(LightlyModule("dino", sequential=False), tmp_path / "dino.ckpt")
    with pytest.raises(ConfigError, match="projection_head holds more than its layers \\(last_layer.weight_g"):
        load_teacher(TeacherConfig(checkpoint=str(tmp_path / "dino.ckpt"), arch="resnet18"), 32)


class Unlisted:
    """An object a weights-only load does not know."""


def test_a_checkpoint_with_other_objects_says_how_to_keep_its_weights(tmp_path):
    """Refused by name, with the two lines that keep only the state_dict; the file so rewritten is a teacher."""
    module = _written_by_lightning(LightlyModule("byol", sequential=False, hparams={"extra": Unlisted()}),
                                   tmp_path / "odd.ckpt")
    with pytest.raises(ConfigError, match="holds a [a-z_.]*Unlisted, .* torch.save\\("
                                          "{'state_dict': c\\['state_dict'\\]}, NEW.ckpt\\)"):
        load_teacher(TeacherConfig(checkpoint=str(tmp_path / "odd.ckpt"), arch="resnet18"), 32)
    c = torch.load(tmp_path / "odd.ckpt", weights_only=False)
    torch.save({"state_dict": c["state_dict"]}, tmp_path / "new.ckpt")
    _assert_teacher_computes(module, tmp_path / "new.ckpt")


@pytest.mark.parametrize("method, cifar, name", [("simclr", True, "backbone"), ("byol", False, "backbone"),
                                                 ("simclr", False, "encoder")])
def test_a_solo_learn_checkpoint_teaches_what_its_module_computes(tmp_path, method, cifar, name):
    """The CIFAR stem's padding 2 included (dogo's own CIFAR stem pads 1): 34 x 34 maps after the first conv."""
    module = _written_by_lightning(SoloModule(method, cifar, name), tmp_path / "solo.ckpt")
    teacher = _assert_teacher_computes(module, tmp_path / "solo.ckpt")
    conv1 = teacher.peer.backbone.conv1
    assert (conv1.kernel_size, conv1.padding) == (((3, 3), (2, 2)) if cifar else ((7, 7), (3, 3)))
    assert "solo-learn" in teacher.source


def test_disco_trains_from_a_lightning_checkpoint(shapes, tmp_path):
    """The whole path: dogo train with teacher.checkpoint=FILE.ckpt and teacher.arch, a CIFAR-stem solo-learn
    teacher distilled into a fresh student."""
    ckpt = tmp_path / "solo.ckpt"
    _written_by_lightning(SoloModule("byol", cifar=True), ckpt)
    raw = tiny_config(shapes, tmp_path / "runs", schedule={"max_steps": 2}, objective={"name": "disco"},
                      teacher={"checkpoint": str(ckpt), "arch": "resnet18"})
    raw["peers"] = {"s": {"arch": "resnet18", "head_hidden": 32, "head_out": 16, "tau": 0.5}}
    assert dogo("train", write_config(tmp_path / "c.yaml", raw)) == 0
    from dogo.core import checkpoint_files
    state = checkpoint_files.load(checkpoint_files.latest(tmp_path / "runs" / "t"))
    teacher = load_teacher(TeacherConfig(checkpoint=str(ckpt), arch="resnet18"), 32)
    assert state["targets"]["teacher_sha256"] == teacher.sha256  # the run's teacher is that module's weights


@pytest.fixture(scope="module")
def solo_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("solo") / "solo.ckpt"
    _written_by_lightning(SoloModule("simclr", cifar=True), path)
    return path


def _rewritten(path, out, change):
    contents = torch.load(path, map_location="cpu", weights_only=True)
    change(contents["state_dict"])
    torch.save(contents, out)
    return out


def test_what_a_lightning_teacher_needs_is_asked_for(solo_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="teacher.arch: .* solo-learn checkpoint, which does not record"):
        load_teacher(TeacherConfig(checkpoint=str(solo_ckpt)), 32)
    with pytest.raises(ConfigError, match="teacher.peer: .* leave teacher.peer empty"):
        load_teacher(TeacherConfig(checkpoint=str(solo_ckpt), arch="resnet18", peer="a"), 32)
    with pytest.raises(ConfigError, match="takes 512 features; resnet50 gives 2048"):
        load_teacher(TeacherConfig(checkpoint=str(solo_ckpt), arch="resnet50"), 32)


def _rename(prefix, to):
    def change(state):
        for key in [k for k in state if k.startswith(prefix)]:
            state[to + key[len(prefix):]] = state.pop(key)
    return change


def _layer_norm_in_projector(state):
    state["projector.1.weight"] = torch.ones(64)
    state["projector.1.bias"] = torch.zeros(64)


def _nan(state):
    state["projector.2.weight"][0, 0] = float("nan")


def _whitening_in_projector(state):  # solo-learn's IterNorm keeps running_wm beside running_mean
    state["projector.1.running_mean"] = torch.zeros(64)
    state["projector.1.running_wm"] = torch.zeros(64, 64)


def _lightly_resnet_generator(state):  # lightly's own CIFAR ResNet: conv1, bn1, layer1-4 (no relu or max-pool)
    for key in [k for k in state if k.startswith("backbone.")]:
        name, _, rest = key[len("backbone."):].partition(".")
        index = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"].index(name)
        state[f"backbone.{index}.{rest}"] = state.pop(key)
    for key in [k for k in state if k.startswith("projector.")]:
        state["projection_head.layers." + key[len("projector."):]] = state.pop(key)


@pytest.mark.parametrize("change, message", [
    (_rename("projector.", "head.mlp."), "neither known layout \\(its modules: backbone, classifier, head\\)"),
    (_layer_norm_in_projector, "projector layer 1 \\(bias, weight\\) is neither a Linear nor a BatchNorm1d"),
    (_rename("projector.", "projector.mlp."), "projector is not an nn.Sequential \\(it has mlp.0.(weight|bias)\\)"),
    (_nan, "non-finite or absurdly large values \\(head.2.weight"),
    (_whitening_in_projector, "projector layer 1 \\(running_mean, running_wm\\) is neither"),
    (_lightly_resnet_generator, "weights at child 2, where ResNet has its relu: it is not a torchvision-layout"),
])
def test_a_lightning_checkpoint_of_another_layout_is_refused_by_name(solo_ckpt, tmp_path, change, message):
    path = _rewritten(solo_ckpt, tmp_path / "changed.ckpt", change)
    with pytest.raises(ConfigError, match=message) as info:
        load_teacher(TeacherConfig(checkpoint=str(path), arch="resnet18"), 32)
    assert str(path) in str(info.value)

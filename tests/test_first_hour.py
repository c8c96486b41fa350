"""Issue 46: what a new user meets in the first hour: the printed lines that load an export with the library alone,
a method switch that takes the method's head, the resolved config printed, and --dry-run opening the data."""
import pytest
import torch

from dogo.core import checkpoint_files
from dogo.engine import config as config_mod
from tests.helpers import REPO, dogo, tiny_config, write_config


def _printed_load_lines(out: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "alone:" in line) + 1
    return [line.strip() for line in lines[start:] if line.startswith("    ")]


@pytest.mark.parametrize("peer, fmt", [({"arch": "resnet18", "cifar_stem": True}, None),
                                       ({"arch": "resnet18"}, "timm"),
                                       ({"arch": "mobilenet_v3_large", "cifar_stem": True}, None)])
def test_the_printed_export_lines_load_with_the_library_alone(shapes, tmp_path, capsys, peer, fmt):
    """Item 5: every line export prints runs as pasted, in a fresh namespace without dogo, and loads the weights
    strictly into a network that computes what the peer's backbone computes (CIFAR stem included)."""
    raw = tiny_config(shapes, tmp_path / "runs", schedule={"max_steps": 1}, objective={"name": "simclr"})
    raw["peers"] = {"p": {**peer, "head_hidden": 32, "head_out": 16, "tau": 0.5}}
    assert dogo("train", write_config(tmp_path / "c.yaml", raw)) == 0
    out = tmp_path / "p.pt"
    capsys.readouterr()
    assert dogo("export", tmp_path / "runs" / "t", out, *(["--format", fmt] if fmt else [])) == 0
    lines = _printed_load_lines(capsys.readouterr().out)
    assert lines and not any("dogo" in line for line in lines), lines
    namespace: dict = {}
    for line in lines:
        exec(line, namespace)  # noqa: S102 - the lines the user is told to paste
    model = namespace["m"].eval()
    from dogo.engine.eval.saved import SavedRun
    run = SavedRun.open(tmp_path / "runs" / "t")
    backbone = run.peers(torch.device("cpu")).peers["p"].backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), backbone(x), rtol=0, atol=0)


def test_a_method_switched_on_the_command_line_takes_its_head(shapes, tmp_path):
    """Item 6: objective.name=vicreg on a file written for SimCLR (512-128 head, tau 0.5) trains VICReg's
    8192-8192-8192 expander, and says so; heads set on the same command line stay."""
    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path, objective={"name": "simclr"}))
    notes: list[str] = []
    cfg = config_mod.load(path, ["objective.name=vicreg"], notes)
    for peer in cfg.peers.values():
        assert (peer.head_hidden, peer.head_out, peer.head_layers) == (8192, 8192, 3)
    assert len(notes) == 2 and "now learns with vicreg (the file: simclr)" in notes[0]
    kept = config_mod.load(path, ["objective.name=vicreg", "peers.a.head_out=64"], notes)
    assert kept.peers["a"].head_out == 64 and kept.peers["b"].head_out == 8192
    same = config_mod.load(path, ["optim.lr=0.1"])  # no switch: the file's heads
    assert same.peers["a"].head_out == 16


def test_dogo_config_prints_the_resolved_config(shapes, tmp_path, capsys):
    """Item 7: the resolved config without training, which loads back to itself."""
    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path))
    capsys.readouterr()
    assert dogo("config", path, "optim.lr=0.25") == 0
    printed = capsys.readouterr().out
    written = tmp_path / "printed.yaml"
    written.write_text(printed)
    assert config_mod.load(written) == config_mod.load(path, ["optim.lr=0.25"])
    assert "auto" not in printed


def test_dry_run_opens_the_data(shapes, tmp_path, capsys):
    """Item 1: --dry-run says "valid" only for a config whose data can be read, and counts it."""
    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path, eval={"knn_every_epochs": 1}))
    capsys.readouterr()
    assert dogo("train", path, "--dry-run") == 0
    said = capsys.readouterr().out
    assert "80 images in 10 classes" in said and "30 images in 10 classes" in said and "a step fits" in said
    assert dogo("train", path, "--dry-run", f"data.path={tmp_path / 'nowhere'}") == 2
    assert "does not exist" in capsys.readouterr().out


def test_train_help_points_to_the_keys(capsys):
    """Item 7: dogo train --help says where every key is documented and how to print the resolved config."""
    with pytest.raises(SystemExit):
        dogo("train", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "docs/config.md" in text and "dogo config CONFIG" in text
    assert (REPO / "docs" / "config.md").is_file()


def test_the_checkpoint_of_a_switched_method_evaluates(shapes, tmp_path):
    """The switched run's checkpoint opens with its own (switched) config: no shape mismatch at eval."""
    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path / "runs", objective={"name": "simclr"},
                                                      schedule={"max_steps": 1}))
    assert dogo("train", path, "objective.name=byol") == 0
    state = checkpoint_files.load(checkpoint_files.latest(tmp_path / "runs" / "t"))
    assert state["config"]["peers"]["a"]["head_out"] == 256


@pytest.mark.parametrize("side, cpu, gpu", [(32, 32, 32), (48, 32, 32), (96, 64, 64), (224, 96, 224), (500, 96, 224)])
def test_view_size_auto_follows_the_images(side, cpu, gpu):
    from dogo.engine.config.resolve import view_size
    assert (view_size(side, on_gpu=False), view_size(side, on_gpu=True)) == (cpu, gpu)


@pytest.mark.parametrize("side, size, blur, stem", [(32, 32, 0.0, False), (96, 64, 0.5, False), (300, 96, 0.5, False)])
def test_image_size_auto_reads_the_training_images(tmp_path, side, size, blur, stem):
    """Item 1: one config for small images and photos alike: data.image_size, augment.blur_p and the peers'
    cifar_stem follow the training images' size (read from their headers); on a CPU the standard stem."""
    from dogo.pipelines.shapes import generate
    root = generate(tmp_path / "data", image_size=side, train_per_class=2, val_per_class=1, seed=0)
    raw = tiny_config(root, tmp_path, data={"image_size": "auto"}, augment={"blur_p": "auto"})
    for peer in raw["peers"].values():
        peer["cifar_stem"] = "auto"
    cfg = config_mod.load(write_config(tmp_path / "c.yaml", raw), ["device=cpu"])
    assert (cfg.data.image_size, cfg.augment.blur_p) == (size, blur)
    assert all(p.cifar_stem is stem for p in cfg.peers.values())


@pytest.mark.parametrize("size, on_gpu, arch, stem", [
    (32, True, "resnet18", True), (64, True, "resnet18", True), (96, True, "resnet18", False),
    (32, False, "resnet18", False), (32, True, "resnet20", False), (32, True, "mobilenet_v3_large", True)])
def test_cifar_stem_auto_takes_the_stem_for_small_views_on_a_gpu_only(size, on_gpu, arch, stem):
    """The CIFAR stem where a GPU affords it (views up to 64 px, backbones that have one); a CPU's first hour gets
    the standard stem, whose step is 10x faster at 32 px."""
    from dogo.engine.config import PeerConfig
    from dogo.engine.config.resolve import _resolve_view_size
    cfg = config_mod.Config(peers={"p": PeerConfig(arch=arch, cifar_stem="auto")})
    cfg.data.image_size = size
    _resolve_view_size(cfg, on_gpu)
    assert cfg.peers["p"].cifar_stem is stem

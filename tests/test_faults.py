"""Bad input and faults that must not pass silently: config values out of range, YAML's number forms, a refused
resume that must leave the run's config alone, and half-written checkpoints left by a kill."""
import pytest

from dogo.engine import checkpoint, config as config_mod
from dogo.engine.config import ConfigError
from tests.conftest import tiny_config, write_config


@pytest.mark.parametrize("override, message", [
    ("peers.a.head_out=0", "peers.a.head_out must be positive"),
    ("peers.b.head_hidden=-1", "peers.b.head_hidden must be positive"),
    ("augment.blur_p=1.5", r"augment.blur_p is a probability: it must be in \[0, 1\]"),
    ("augment.flip_p=-0.1", "augment.flip_p is a probability"),
    ("data.workers=-1", "data.workers must be 0 or more"),
    ("optim.lr=-0.3", "optim.lr must be 0 or more"),
    ("peers.a.lr=-1", "peers.a.lr must be 0 or more"),
    ("checkpoint.every_steps=-5", "checkpoint.every_steps must be 0 or more"),
    ("name=../../elsewhere", "must be a plain folder name"),
    ("name=a/b", "must be a plain folder name"),
])
def test_out_of_range_values_are_config_errors(shapes, tmp_path, override, message):
    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path))
    with pytest.raises(ConfigError, match=message):
        config_mod.load(path, [override])


def test_numbers_in_yaml_exponent_form_are_numbers(shapes, tmp_path):
    """PyYAML reads 3e-4 (no dot) as a string; a float key takes it as the number it is."""
    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path))
    text = path.read_text().replace("lr: 0.5", "lr: 3e-4")
    assert "lr: 3e-4" in text
    path.write_text(text)
    cfg = config_mod.load(path, ["optim.weight_decay=1e-6"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 1e-6
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'fast'"):
        config_mod.load(path, ["optim.lr=fast"])


def test_a_refused_resume_leaves_the_runs_config_as_it_was(shapes, tmp_path):
    from dogo.engine.train import train
    cfg = config_mod.from_dict(tiny_config(shapes, tmp_path, schedule={"max_steps": 2}))
    train(cfg)
    written = (cfg.run_dir / "config.yaml").read_text()
    other = config_mod.from_dict(tiny_config(shapes, tmp_path, schedule={"max_steps": 4}, data={"batch_size": 16}))
    with pytest.raises(checkpoint.CheckpointError, match="batch_size"):
        train(other)
    assert (cfg.run_dir / "config.yaml").read_text() == written


def test_half_written_checkpoints_of_a_killed_run_are_removed_at_start(shapes, tmp_path):
    from dogo.engine.train import train
    cfg = config_mod.from_dict(tiny_config(shapes, tmp_path, schedule={"max_steps": 1}))
    folder = checkpoint.folder(cfg.run_dir)
    folder.mkdir(parents=True)
    stale = folder / ".step_000000003.pt.k2j4x.tmp"  # what atomic_write leaves when killed mid-write
    stale.write_bytes(b"half a checkpoint")
    train(cfg)
    assert not stale.exists()
    assert "stale_temporaries" in (cfg.run_dir / "metrics.jsonl").read_text()

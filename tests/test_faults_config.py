"""Issue 44's config and command-line cases: a config file is user input (duplicate keys, alias bombs, encodings,
deep base: chains), overrides merge into sections, every number is checked where it is read, and every command
refuses a bad argument in one line. Each test names its case id."""
import time

import pytest

from dogo.core.errors import ConfigError
from dogo.engine import config as config_mod
from tests.helpers import dogo, tiny_config, write_config


def _file(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_H4a_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    path = _file(tmp_path, "optim:\n  lr: 0.1\nschedule:\n  epochs: 3\noptim:\n  name: sgd\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: line 5: key 'optim' appears twice .*also on line 1"):
        config_mod.load(path)
    path = _file(tmp_path, "optim:\n  name: sgd\n  name: adamw\n")
    with pytest.raises(ConfigError, match="key 'name' appears twice"):
        config_mod.load(path)


def test_H4a_yaml_merge_keys_still_override():
    """`<<: *base` then a key of the anchor: YAML's override, not a duplicate."""
    from dogo.engine.config.loading import parse_yaml
    assert parse_yaml("a: &o {lr: 0.1, name: sgd}\nb:\n  <<: *o\n  lr: 0.2\n", "t")["b"] == {"lr": 0.2, "name": "sgd"}


@pytest.mark.parametrize("depth", [7, 9])
def test_S4_an_alias_bomb_is_refused_at_once(tmp_path, depth):
    """Anchors a0..aN, each a list of nine aliases of the previous: 9^N values from a few hundred bytes."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, depth + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    path = _file(tmp_path, "\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than 100,000 values through YAML aliases"):
        config_mod.load(path)
    assert time.perf_counter() - start < 2


def test_H4d_a_file_that_is_not_utf8_is_named(shapes, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"c\.yaml is not UTF-8 text .*save it as UTF-8"):
        config_mod.load(path)
    path.write_bytes("optim:\n  lr: 0.1\n".encode("utf-16"))
    with pytest.raises(ConfigError, match=r"c\.yaml is UTF-16 text .*save it as UTF-8"):
        config_mod.load(path)
    import yaml
    good = yaml.safe_dump(tiny_config(shapes, tmp_path, optim={"lr": 0.125}))
    path.write_bytes(("\ufeff" + good).encode("utf-8"))  # a UTF-8 byte-order mark is fine
    assert config_mod.load(path).optim.lr == 0.125


def test_a_config_file_larger_than_a_config_is_refused(tmp_path):
    path = _file(tmp_path, "# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="more than a config's"):
        config_mod.load(path)


def test_BS4_a_deep_base_chain_is_refused_without_recursion(shapes, tmp_path):
    for i in range(1200):
        (tmp_path / f"c{i}.yaml").write_text(f"base: c{i + 1}.yaml\n")
    write_config(tmp_path / "c1200.yaml", tiny_config(shapes, tmp_path, optim={"lr": 0.5}))
    with pytest.raises(ConfigError, match="base: chain is more than 64 files deep"):
        config_mod.load(tmp_path / "c0.yaml")
    assert config_mod.load(tmp_path / "c1150.yaml").optim.lr == 0.5  # 50 deep: fine


def test_H4b_an_override_with_a_mapping_merges_into_the_section(shapes, tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path, optim={"name": "adamw", "lr": 0.01,
                                                                                  "weight_decay": 0.05},
                                                         data={"batch_size": 32, "image_size": 32}))
    cfg = config_mod.load(path, ["optim={lr: 0.5}", "data={}"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 0.5, 0.05)
    assert (cfg.data.batch_size, cfg.data.image_size) == (32, 32)
    with pytest.raises(ConfigError, match="optim.lrr"):
        config_mod.load(path, ["optim={lrr: 0.5}"])


@pytest.mark.parametrize("override, match", [
    ("schedule.final_lr_ratio=-5", "schedule.final_lr_ratio .* must be in \\[0, 1\\]"),
    ("optim.betas=[0.9, 1.5]", "optim.betas .* each in \\[0, 1\\)"),
    ("optim.momentum=-0.1", "optim.momentum must be in \\[0, 1\\)"),
    ("eval.online_probe_lr=0", "eval.online_probe_lr must be positive"),
    ("optim.eps=0", "optim.eps must be positive"),
    ("schedule.warmup_epochs=-1", "schedule.warmup_epochs must be 0 or more"),
    ("optim.clip_grad_norm=-1", "optim.clip_grad_norm must be 0 or more"),
])
def test_X2_optimiser_numbers_outside_their_ranges(shapes, tmp_path, override, match):
    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path))
    with pytest.raises(ConfigError, match=match):
        config_mod.load(path, [override])


@pytest.mark.parametrize("name", ["a.b", "", "two words", "1st"])
def test_S6_a_peer_name_that_cannot_be_a_key_is_refused(shapes, tmp_path, name):
    raw = tiny_config(shapes, tmp_path)
    raw["peers"] = {name: raw["peers"]["a"], "b": raw["peers"]["b"]}
    with pytest.raises(ConfigError, match="is not a usable peer name"):
        config_mod.load(write_config(tmp_path / "c.yaml", raw))


@pytest.mark.parametrize("override", ["eval.knn_protocol=custom eval.knn_k=20 eval.knn_temperature=nan",
                                      "eval.knn_protocol=custom eval.knn_k=20 eval.knn_temperature=0",
                                      "eval.knn_protocol=custom eval.knn_k=0 eval.knn_temperature=0.1"])
def test_L3_X1_overrides_at_eval_are_checked_as_at_training(shapes, tmp_path, override):
    """A stored config with a command's overrides goes through the same checks as a file (dogo eval knn RUN ...)."""
    stored = config_mod.to_dict(config_mod.load(write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path))))
    with pytest.raises(ConfigError, match="eval.knn_(temperature|k) must be"):
        config_mod.from_dict(stored, override.split())


@pytest.mark.parametrize("unknown, suggested", [
    ("batch_size=8", "'data.batch_size'"),
    ("epochs=3", "'schedule.epochs'"),
    ("optim.learning_rate=0.1", "'optim.lr'"),
    ("data.num_workers=2", "'data.workers'"),
    ("peers.a.temperature=0.2", "'peers.a.tau'"),
])
def test_did_you_mean_searches_every_section(shapes, tmp_path, unknown, suggested):
    """Issue 46 (7): the nearest key in any section, and the names other tools give our keys."""
    path = write_config(tmp_path / "c.yaml", tiny_config(shapes, tmp_path))
    with pytest.raises(ConfigError, match=f"did you mean {suggested}"):
        config_mod.load(path, [unknown])


# -- every command refuses bad arguments in one line --------------------------------------------------------------

BAD_ARGUMENTS = [
    ("eval", "linear", "RUN", "--epochs", "-5"), ("eval", "linear", "RUN", "--epochs", "0"),
    ("eval", "linear", "RUN", "--lr", "nan"), ("eval", "linear", "RUN", "--lr", "-1"),
    ("eval", "linear", "RUN", "--batch-size", "0"), ("eval", "linear", "RUN", "--batch-size", "-8"),
    ("eval", "linear", "RUN", "--protocol", "slow"), ("eval", "table", "RUN", "--epochs", "x"),
    ("bench", "train", "CFG", "--steps", "0"), ("bench", "train", "CFG", "--repeats", "0"),
    ("bench", "train", "CFG", "--warmup", "-1"), ("bench", "train", "CFG", "--peak-tflops", "inf"),
    ("bench", "pipeline", "--backend", "folder", "--batch", "0"), ("bench", "recipe", "--size", "0"),
    ("bench", "loss", "--views", "0"), ("bench", "loss", "--dim", "-3"), ("bench", "loss", "--tile", "0"),
    ("bench", "loss", "--max-seconds", "nan"), ("train", "CFG", "--dry-run", "--world-size", "0"),
    ("convert", "SRC", "DST", "--chunk-size", "0"), ("convert", "SRC", "DST", "--compress-probability", "2"),
    ("convert", "SRC", "DST", "--num-workers", "-1"), ("convert", "SRC", "DST", "--max-resolution", "0"),
    ("plot", "features", "RUN", "--method", "mds"), ("plot", "nothing"), ("export", "RUN"), ("frobnicate",),
]


@pytest.mark.parametrize("argv", BAD_ARGUMENTS, ids=lambda a: " ".join(a))
def test_every_subcommand_refuses_a_bad_argument_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        dogo(*argv)
    assert stop.value.code == 2
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dogo") and "--help" in lines[0], lines

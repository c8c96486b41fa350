"""Config loading: strict keys with suggestions, type checks, overrides, and a round trip through the run folder."""
import pytest

from dogo.core.errors import ConfigError

from dogo.engine.config import Config, dump, load
from tests.helpers import REPO, write_config


def test_shipped_configs_load(shapes):
    """Every shipped config loads, resolves each peer's method and temperature, and names a registered backend. A
    config whose view size follows its images (image_size: auto) reads them, so it is pointed at a small folder."""
    from dogo.core.registry import BACKENDS, METHODS
    from dogo.engine.config.loading import read_yaml
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name.startswith("study_"):
            continue  # a study of training configs: tests/test_study.py
        raw = read_yaml(path)  # with its base: chain
        follows_images = raw.get("data", {}).get("image_size") == "auto"
        cfg = load(path, [f"data.path={shapes}"] if follows_images else [])
        assert cfg.name == raw["name"] and cfg.data.backend in BACKENDS, path
        for name, peer in cfg.peers.items():
            assert peer.ssl in METHODS and peer.arch == raw["peers"][name]["arch"], (path, name)
            if METHODS.get(peer.ssl, "ssl").default_tau is not None:
                assert peer.tau == raw["peers"][name].get("tau", METHODS.get(peer.ssl, "ssl").default_tau), (path, name)


def test_unknown_key_names_the_file_and_nearest_key(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"c\.yaml.*optim\.lrr.*did you mean 'optim.lr'"):
        load(path)


def test_unknown_section(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"optimiser": {"lr": 0.1}})
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        load(path)


@pytest.mark.parametrize("override,match", [
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("data.batch_size=1.5", "data.batch_size: expected an integer"),
    ("objective.name=swav", "objective.name: 'swav' is not a registered objective or SSL method; registered: simclr, mocov2, simsiam, byol, vicreg, barlowtwins, dino, dogo, disco"),
    ("data.batchsize=3", "did you mean 'data.batch_size'"),
    ("peers.r19.tau=0.2", "did you mean 'r18'"),
    ("optim.lr", "key=value"),
    ("augment.crop_scale=[0.5]", "list of 2 numbers"),
    ("peers.r18.cifar_stem=1", "true or false"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load(None, ["objective.name=simclr", override] if "objective" not in override else [override])


def test_overrides_apply_with_types():
    cfg = load(None, ["objective.name=simclr", "optim.lr=1", "augment.crop_scale=[0.2, 1]",
                      "peers.r18.lr=null", "peers.r18.cifar_stem=true"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.augment.crop_scale == (0.2, 1.0)
    assert cfg.peers["r18"].cifar_stem is True
    assert load(None, ["objective.name=simclr", "log.progress=off"]).log.progress == "off"


def test_dogo_needs_two_peers():
    with pytest.raises(ConfigError, match="exactly 2 peers"):
        load(None, ["objective.name=dogo"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load(REPO / "configs" / "demo.yaml", ["optim.lr=0.01"])
    dump(cfg, tmp_path / "config.yaml")
    assert load(tmp_path / "config.yaml") == cfg


def test_docs_config_documents_every_config_key():
    """docs/config.md (generated from the dataclasses' comments) against an independent walk of the defaults."""
    import dataclasses
    readme = (REPO / "docs" / "config.md").read_text()
    defaults = Config()
    keys = []
    def walk(node, prefix):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):  # a section, or a method's or backend's sub-section
                walk(value, f"{prefix}{f.name}.")
            else:
                keys.append(prefix + f.name)
    for field in dataclasses.fields(Config):
        value = getattr(defaults, field.name)
        if field.name == "peers":
            walk(value["r18"], "peers.NAME.")
        elif dataclasses.is_dataclass(value):
            walk(value, f"{field.name}.")
        else:
            keys.append(field.name)
    assert len(keys) > 60
    missing = [k for k in keys if f"`{k}`" not in readme]
    assert not missing, f"docs/config.md does not document: {missing}"


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.lr=.inf", "peers.r18.tau=nan", "optim.weight_decay=nan",
                                      "augment.blur_sigma=[0.1, .inf]", "peers.r18.kl_weight=-.inf"])
def test_nan_and_inf_are_refused_for_every_float_key(override):
    """Issue 32 C13: range checks written as comparisons let NaN through (NaN < 0 is false)."""
    with pytest.raises(ConfigError, match=r"must be a finite number"):
        load(REPO / "configs" / "demo.yaml", [override])


def test_a_config_extends_its_base(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\noptim: {name: sgd, lr: 0.1}\npeers:\n  x: {arch: resnet18}\n"
                                     "  y: {arch: resnet34}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\noptim: {lr: 0.5}\nobjective: {name: simclr}\n"
                                     "peers:\n  z: {arch: resnet50}\n")
    cfg = load(tmp_path / "b.yaml")
    assert cfg.name == "b" and cfg.optim.name == "sgd" and cfg.optim.lr == 0.5  # sections merge key by key
    assert list(cfg.peers) == ["z"]  # peers replace the base's whole


@pytest.mark.parametrize("files, match", [
    ({"a.yaml": "base: gone.yaml\n"}, r"gone.yaml \(the base of .*a.yaml\) does not exist"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "chain comes back to itself"),
    ({"a.yaml": "base: [1]\n"}, "expected the path of another config file"),
])
def test_bad_bases_are_named(tmp_path, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match):
        load(tmp_path / "a.yaml")


@pytest.mark.parametrize("override, match", [
    ("data.beton=x.beton", "'data.beton' has moved into its method's or backend's own section: write 'data.ffcv.beton'"),
    ("peers.r18.queue_size=8", "write 'peers.r18.mocov2.queue_size'"),
    ("peers.r18.mocov2.queue_size=4096", "peers.r18.mocov2 is set but peers.r18 learns with simclr"),
    ("data.dali.scan=ends", "data.dali is set but data.backend=folder"),
])
def test_sections_belong_to_the_method_or_backend_in_use(override, match):
    with pytest.raises(ConfigError, match=match):
        load(None, ["objective.name=simclr", override])


def test_a_moved_key_in_a_file_names_the_new_one(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"peers": {"r18": {"ssl": "simsiam", "pred_hidden": 64}}})
    with pytest.raises(ConfigError, match="peers.r18.pred_hidden' has moved.*'peers.r18.simsiam.pred_hidden'"):
        load(path)


def test_a_stored_config_in_the_old_layout_loads(tmp_path):
    """A checkpoint's config written before the sub-sections: its keys are moved for it, nothing is lost."""
    from dogo.engine.config import from_dict
    cfg = from_dict({"objective": {"name": "mocov2"}, "peers": {"m": {"queue_size": 512, "moco_symmetric": True}},
                     "data": {"backend": "synthetic", "synthetic_images": 99}})
    assert cfg.peers["m"].mocov2.queue_size == 512 and cfg.peers["m"].mocov2.symmetric
    assert cfg.data.synthetic.images == 99

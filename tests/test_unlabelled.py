"""Training from images without labels (data.labels=none): a folder of images at any depth, and an FFCV .beton
converted with --labels none; clear errors for an empty folder and for evaluation that needs labels."""
import json
import shutil

import numpy as np
import pytest

from dogo.engine import config as config_mod
from dogo.core.errors import ConfigError, DataError
from dogo.pipelines.imagefolder import scan
from tests.helpers import dogo, tiny_config, write_config


@pytest.fixture(scope="module")
def loose(shapes, tmp_path_factory):
    """The shapes' training images without class folders: some at the top, the rest two and three levels down."""
    root = tmp_path_factory.mktemp("loose")
    files = sorted((shapes / "train").rglob("*.jpg"))
    for i, f in enumerate(files):
        where = root / "train" / ("" if i % 3 == 0 else f"day{i % 2}/cam{i % 3}" if i % 3 == 1 else f"x/y/z{i % 2}")
        where.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, where / f"{i:03d}_{f.name}")
    return root, len(files)


def test_scan_finds_every_image_at_any_depth_without_labels(loose):
    root, n = loose
    index = scan(root / "train", labels="none")
    assert len(index) == n and index.classes == [] and (index.labels == -1).all()
    assert len(set(index.paths)) == n and index.paths == scan(root / "train", labels="none").paths  # a fixed order


def test_an_empty_unlabelled_folder_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "a" / "b").mkdir(parents=True)
    (tmp_path / "train" / "a" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match=r"train \(data.labels=none\) holds no images .* at any depth"):
        scan(tmp_path / "train", labels="none")


@pytest.mark.slow
def test_training_from_an_unlabelled_folder(loose, tmp_path):
    root, _ = loose
    cfg = tiny_config(root, tmp_path, schedule={"max_steps": 3})
    cfg["data"]["labels"] = "none"
    assert dogo("train", str(write_config(tmp_path / "c.yaml", cfg))) == 0
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in steps)
    written = config_mod.load(tmp_path / "t" / "config.yaml")
    assert written.data.labels == "none"


def test_the_kNN_monitor_on_unlabelled_data_says_what_to_do(loose, tmp_path):
    root, _ = loose
    raw = tiny_config(root, tmp_path, eval={"knn_every_epochs": 1})
    raw["data"]["labels"] = "none"
    with pytest.raises(ConfigError, match="dogo eval knn RUN data.path=LABELLED data.labels=folders"):
        config_mod.check(config_mod.from_dict(raw))


@pytest.mark.slow
def test_convert_an_unlabelled_folder_and_train_from_it(loose, tmp_path):
    pytest.importorskip("ffcv", reason="the ffcv extra is not installed")
    from dogo.pipelines.convert import ConvertOptions, convert
    root, n = loose
    beton = tmp_path / "loose.beton"
    report = convert(root / "train", beton, ConvertOptions(num_workers=1, labels="none"), log=lambda m: None)
    assert report["images_written"] == n
    classes = json.loads(beton.with_name("loose.classes.json").read_text())
    assert classes["classes"] == [] and classes["images_per_class"] == []
    cfg = tiny_config(root, tmp_path, schedule={"max_steps": 2})
    cfg["data"].update(backend="ffcv", labels="none", ffcv={"beton": str(beton)})
    assert dogo("train", str(write_config(tmp_path / "c.yaml", cfg))) == 0
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]

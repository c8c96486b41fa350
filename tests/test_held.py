"""The held backend: reading CIFAR's python format (and refusing what is not it) and decoding image folders, the same
views from both sources, the batched crop against torchvision, sharding and resume, kNN on its val split, splits too
large to hold and images of several sizes refused."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from dogo.engine import config as config_mod
from dogo.engine.config import AugmentConfig
from dogo.core.errors import DataError
from dogo.pipelines.recipe import device as A, params as P
from dogo.pipelines.backends.held import HeldEvalSplit, HeldLoader
from dogo.pipelines.heldsplit import read_split
from tests.helpers import loader_spec, views_of

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-dev"


def write_cifar10(root: Path, per_batch=(40, 40), test=30, bytes_keys=True, seed=0) -> Path:
    """A small CIFAR-10 folder in the downloaded layout; keys as bytes (Python 3 pickles) or str (Python 2's)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)

    def dump(name, n):
        batch = {key("data"): rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 key("labels"): rng.integers(0, 10, n).tolist(), key("batch_label"): key(name)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))

    for i, n in enumerate(per_batch, start=1):
        dump(f"data_batch_{i}", n)
    dump("test_batch", test)
    names = [key(c) for c in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                              "truck")]
    (folder / "batches.meta").write_bytes(pickle.dumps({key("label_names"): names}, protocol=2))
    return folder


@pytest.fixture
def cifar(tmp_path):
    return write_cifar10(tmp_path)


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_reads_both_pickle_key_forms_from_the_folder_or_its_parent(tmp_path, bytes_keys):
    folder = write_cifar10(tmp_path, bytes_keys=bytes_keys)
    for path in (folder, tmp_path):
        train, test = read_split(path, "train"), read_split(path, "test")
        assert (len(train), len(test)) == (80, 30) and train.images.shape == (80, 3, 32, 32)
        assert train.classes[0] == "airplane" and train.labels.dtype == np.int64
    raw = pickle.loads((folder / "data_batch_2").read_bytes(), encoding="bytes")
    row = raw[b"data" if bytes_keys else "data"][3]
    # CIFAR stores each image as 1024 red, then 1024 green, then 1024 blue bytes, rows top to bottom
    assert np.array_equal(train.images[43], row.reshape(3, 32, 32))


def test_cifar100_layout(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 20), ("test", 10)):
        (folder / name).write_bytes(pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                                  b"fine_labels": rng.integers(0, 100, n).tolist(),
                                                  b"coarse_labels": rng.integers(0, 20, n).tolist()}))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    split = read_split(tmp_path, "train")
    assert len(split) == 20 and len(split.classes) == 100


def test_truncated_and_foreign_files_are_named(cifar):
    whole = (cifar / "data_batch_1").read_bytes()
    (cifar / "data_batch_1").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match="data_batch_1 is not a readable CIFAR python batch.*download it again"):
        read_split(cifar, "train")


def test_a_pickle_that_would_run_code_is_refused_not_run(cifar, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (cifar / "test_batch").write_bytes(pickle.dumps({"data": Payload()}))
    with pytest.raises(DataError, match="test_batch is not a readable CIFAR python batch.*refusing to load"):
        read_split(cifar, "test")
    assert not marker.exists()


def test_wrong_shapes_labels_and_splits_are_errors(cifar, tmp_path):
    with pytest.raises(DataError, match="splits train and test .val reads test., not 'valid'.*data.val_split=val"):
        read_split(cifar, "valid")
    assert np.array_equal(read_split(cifar, "val").images, read_split(cifar, "test").images)
    with pytest.raises(DataError, match="neither CIFAR's python format nor an image folder"):
        read_split(tmp_path / "nothing", "train")
    bad = {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}
    (cifar / "test_batch").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match="test_batch: 'data' is not a uint8 array of N x 3072"):
        read_split(cifar, "test")
    bad = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}
    (cifar / "test_batch").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match=r"test_batch: labels outside 0..9"):
        read_split(cifar, "test")


def test_batched_resized_crop_equals_torchvision_per_image():
    """One grid_sample for the batch: every image its own box and mirror, as torchvision's resized_crop (no
    antialiasing) and horizontal_flip image by image."""
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 255
    keys = P.stream_keys(0, 0, np.arange(64), 0)
    boxes = torch.from_numpy(P.crop_boxes(keys, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3)))
    flips = torch.arange(64) % 3 == 0
    for size in (32, 48, 20):
        ours = A.resized_crops(x, boxes, flips, size)
        theirs = torch.stack([TF.resized_crop(img, int(t), int(left), int(h), int(w), [size, size],
                                              antialias=False) for img, (left, t, w, h) in zip(x, boxes)])
        theirs = torch.where(flips.view(-1, 1, 1, 1), theirs.flip(-1), theirs)
        torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)  # float32 rounding of the coordinates


def _loader(path, rank=0, world_size=1, batch=16, seed=5, recipe=AugmentConfig(blur_p=0.5), size=32):
    return HeldLoader(read_split(path, "train"), loader_spec(size, recipe, batch, seed=seed, rank=rank,
                                                             world=world_size))


def test_two_ranks_make_exactly_the_views_of_one_and_resume_skips_steps(cifar):
    whole = list(_loader(cifar))
    halves = [list(_loader(cifar, rank=r, world_size=2)) for r in (0, 1)]
    assert len(whole) == 5
    for step, batch in enumerate(whole):
        for v in range(2):
            # the ops run over runs of other sizes, so last bits may differ (oneDNN picks kernels by shape)
            torch.testing.assert_close(torch.cat([views_of(halves[0][step])[v], views_of(halves[1][step])[v]]),
                                       views_of(batch)[v], atol=1e-5, rtol=0)
        assert torch.equal(torch.cat([halves[0][step].labels, halves[1][step].labels]), batch.labels)
    resumed = _loader(cifar)
    resumed.set_epoch(0, start_step=3)
    assert len(resumed) == 2
    for a, b in zip(resumed, whole[3:]):
        torch.testing.assert_close(views_of(a)[1], views_of(b)[1], atol=1e-5, rtol=0)
        assert torch.equal(a.labels, b.labels)
    other_epoch = _loader(cifar)
    other_epoch.set_epoch(1)
    assert not torch.equal(next(iter(other_epoch)).labels, whole[0].labels)


def test_views_are_the_stored_images_cropped_and_labels_are_theirs(cifar):
    """With every random op off and the crop the whole frame, a view is the stored image, normalised."""
    recipe = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0, jitter_p=0, grayscale_p=0,
                           blur_p=0, mean=(0, 0, 0), std=(1, 1, 1))
    loader = _loader(cifar, seed=1, recipe=recipe)
    data = read_split(cifar, "train")
    idx = loader.shard.indices(0, 0)
    batch = next(iter(loader))
    torch.testing.assert_close(views_of(batch)[0], torch.from_numpy(data.images[idx]).float() / 255, atol=1e-6,
                               rtol=0)
    assert batch.labels.tolist() == data.labels[idx].tolist()


def test_eval_split_is_the_whole_frame_normalised(cifar):
    split = HeldEvalSplit(read_split(cifar, "test"), 32)
    recipe = AugmentConfig(mean=(0, 0, 0), std=(1, 1, 1))
    (x, y), = split.batches(np.arange(len(split)), 64, torch.device("cpu"), recipe, torch.float32, False)
    data = read_split(cifar, "test")
    torch.testing.assert_close(x, torch.from_numpy(data.images).float() / 255)
    assert y.tolist() == data.labels.tolist()


def test_training_with_the_knn_monitor_on_cifar(cifar, tmp_path):
    from dogo.engine.run.trainer import train
    from tests.helpers import tiny_config
    raw = tiny_config(cifar, tmp_path, data={"backend": "held", "train_split": "train", "val_split": "val",
                                             "image_size": 32, "batch_size": 16},
                      eval={"knn_every_epochs": 1, "knn_protocol": "custom", "knn_k": 5, "knn_temperature": 0.07, "batch_size": 32}, schedule={"max_steps": 0})
    raw["peers"] = {"a": {"arch": "resnet18", "head_hidden": 16, "head_out": 8, "tau": 0.5}}
    raw["objective"] = {"name": "simclr"}
    train(config_mod.from_dict(raw))
    import json
    events = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    knn = [e for e in events if e.get("event") == "knn"]
    assert len(knn) == 1 and 0 <= knn[0]["top1"]["a"] <= 100


@pytest.mark.skipif(not DEV.is_dir(), reason="the shared CIFAR-10 dev set is not on this machine")
def test_the_dev_set_reads_as_its_readme_says():
    train, test = read_split(DEV, "train"), read_split(DEV, "test")
    assert (len(train), len(test)) == (1522, 761) and len(train.classes) == 10
    assert set(np.unique(test.labels)) == set(range(10))


@pytest.mark.slow  # the folder and torchvision contenders start worker processes
def test_bench_pipeline_cifar_interleaves_its_contenders(cifar):
    from dogo.benchmarks.pipeline import bench_cifar
    r = bench_cifar(cifar, size=16, batch=8, batches=1, warmup=0, repeats=2, workers=1, device=torch.device("cpu"),
                    log=lambda m: None)
    for key in ("backend_two_views", "folder_two_views", "torchvision"):
        assert len(r[key]["repeats"]) == 2 and all(v > 0 for v in r[key]["repeats"]), key
        assert r[key]["images_per_s"] == pytest.approx(sum(r[key]["repeats"]) / 2)  # the median of two
    assert r["ratio_to_folder"] == pytest.approx(r["backend_two_views"]["images_per_s"]
                                                 / r["folder_two_views"]["images_per_s"])


CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")  # sorted


def write_twins(root: Path, train=48, val=20, seed=0) -> tuple[Path, Path]:
    """The same random 32 px images as CIFAR's python format and as an image folder of lossless PNGs. Labels rise
    with the index (and CIFAR-10's class names are sorted), so that image i is image i in both: the folder lists
    class folders, then files, in sorted order."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder, cifar = root / "folder", root / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for split, n, batch_file in (("train", train, "data_batch_1"), ("val", val, "test_batch")):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = np.arange(n) * 10 // n  # every class, in order
        (cifar / batch_file).write_bytes(pickle.dumps({b"data": images.reshape(n, -1),
                                                       b"labels": labels.tolist()}, protocol=2))
        for c in CLASSES:  # every class folder, even one without images here
            (folder / split / c).mkdir(parents=True, exist_ok=True)
        for i, (image, y) in enumerate(zip(images, labels)):
            Image.fromarray(image.transpose(1, 2, 0)).save(folder / split / CLASSES[y] / f"{i:05d}.png")
    (cifar / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}, protocol=2))
    return folder, cifar


@pytest.mark.parametrize("size", [32, 24])
def test_an_image_folder_and_the_cifar_format_give_the_same_views(tmp_path, size):
    folder, cifar = write_twins(tmp_path)
    a, b = read_split(folder, "train", processes=2), read_split(cifar, "train")
    assert a.classes == b.classes and np.array_equal(a.labels, b.labels) and np.array_equal(a.images, b.images)
    recipe = AugmentConfig(blur_p=0.5, solarize_p=0.3)
    for epoch in (0, 1):
        loaders = [_loader(path, recipe=recipe, size=size) for path in (folder, cifar)]
        for loader in loaders:
            loader.set_epoch(epoch)
        for x, y in zip(*loaders):
            assert torch.equal(x.labels, y.labels)
            for v in range(2):
                assert torch.equal(views_of(x)[v], views_of(y)[v])  # bit for bit
    recipe = AugmentConfig()
    evals = [HeldEvalSplit(read_split(path, "val"), size) for path in (folder, cifar)]
    (xa, ya), = evals[0].batches(np.arange(20), 32, torch.device("cpu"), recipe, torch.float32, False)
    (xb, yb), = evals[1].batches(np.arange(20), 32, torch.device("cpu"), recipe, torch.float32, False)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_jpeg_folder_decodes_to_the_loaders_pixels_and_reports_what_it_skips(tmp_path):
    from PIL import Image

    from dogo.pipelines.images import load_rgb
    rng = np.random.default_rng(1)
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(70):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "train" / c / f"{i:03d}.jpg",
                                                                                   quality=80)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / "train" / "b" / "grey.jpg")
    whole = (root / "train" / "a" / "001.jpg").read_bytes()
    (root / "train" / "a" / "001.jpg").write_bytes(whole[:len(whole) // 2])  # truncated
    (root / "train" / "b" / "empty.jpg").write_bytes(b"")
    (root / "train" / "loose.jpg").write_bytes(whole)  # beside the class folders
    with pytest.warns(UserWarning, match="beside the class folders"):
        split = read_split(root, "train", processes=2)
    assert len(split) == 140 and split.images.shape == (140, 3, 32, 32)
    assert sorted(line.split(":")[0].rsplit("/", 1)[-1] for line in split.skipped) == \
        ["001.jpg", "empty.jpg", "loose.jpg"]
    kept = [p for p in sorted((root / "train").glob("*/*.jpg")) if p.relative_to(root) not in
            (Path("train/a/001.jpg"), Path("train/b/empty.jpg"))]
    for i in (0, 68, 69, 70, 139):  # grey.jpg among them
        assert np.array_equal(split.images[i], load_rgb(str(kept[i])).transpose(2, 0, 1)), kept[i]
    assert split.labels.tolist() == [0] * 69 + [1] * 71
    with pytest.warns(UserWarning):
        loader = _loader(root, batch=32)
    first, second = list(loader)[:2]
    assert len(first.skipped) == 3 and second.skipped == [] and loader.skipped == first.skipped


def test_images_of_several_sizes_are_refused_naming_the_folder_backend(tmp_path):
    from PIL import Image
    for i, side in enumerate((32, 32, 40)):
        (tmp_path / "train" / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(tmp_path / "train" / "c" / f"{i}.png")
    with pytest.raises(DataError, match=r"1 of 3 differ from the first one's 32 x 32.*2.png \(40 x 40\).*"
                                        r"data.backend=folder"):
        read_split(tmp_path, "train")


def test_a_split_too_large_to_hold_names_the_folder_backend(tmp_path, monkeypatch):
    from dogo.pipelines.backends import held
    _, cifar = write_twins(tmp_path)
    held.check_holdable(cifar, "train", torch.device("cpu"))  # 150 kB: fits
    monkeypatch.setattr(held, "HOLD_SHARE", 1e-12)
    with pytest.raises(DataError, match=r"48 images of 32 x 32 .* GiB held whole, over 0% of .* available: train it "
                                        r"with data.backend=folder"):
        held.check_holdable(cifar, "train", torch.device("cpu"))


def test_the_memory_estimate_counts_the_held_split(tmp_path):
    from dogo.core.precision import Precision
    from dogo.engine.run.memory import memory_model
    from tests.helpers import tiny_config
    folder, cifar = write_twins(tmp_path)
    for path in (folder, cifar):
        cfg = config_mod.from_dict(tiny_config(path, tmp_path, data={"backend": "held", "image_size": 32}))
        parts = memory_model(cfg, 1, Precision.of(cfg)).fixed
        assert parts["held images"] == 48 * (3 * 32 * 32 + 8)  # pixels and labels
    cfg = config_mod.from_dict(tiny_config(folder, tmp_path))  # the folder backend streams: nothing held
    assert memory_model(cfg, 1, Precision.of(cfg)).fixed["held images"] == 0


def test_the_shipped_cifar_config_trains_from_an_image_folder(tmp_path):
    """`dogo train configs/cifar10_simclr_r18.yaml data.path=FOLDER`: the CIFAR config on train/ and val/ folders,
    with the kNN monitor on the val folder."""
    from dogo.engine.run.trainer import train
    from tests.helpers import REPO
    folder, _ = write_twins(tmp_path)
    cfg = config_mod.load(REPO / "configs" / "cifar10_simclr_r18.yaml", [
        f"data.path={folder}", "data.batch_size=16", f"out_dir={tmp_path / 'runs'}", "schedule.max_steps=2",
        "peers.r18.head_hidden=16", "peers.r18.head_out=8", "eval.knn_every_epochs=1",
        "log.progress=off", "device=cpu"])
    result = train(cfg)
    assert result["step"] == 2 and 0 <= result["knn_top1"]["r18"] <= 100


def test_the_data_check_counts_both_sources(tmp_path, capsys):
    from dogo.pipelines import check
    folder, cifar = write_twins(tmp_path)
    for path in (folder, cifar):
        assert check.main(["held", str(path)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert "train: 48 images of 32 x 32 in 10 classes" in out[0] and "val: 20 images" in out[1]
    assert check.main(["held", str(tmp_path / "nothing")]) == 2
    assert "neither CIFAR's python format nor an image folder" in capsys.readouterr().out

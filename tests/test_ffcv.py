"""The FFCV backend: the shared order and sharding, resume position, quasi-random order, and a training run."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv", reason="the ffcv extra is not installed")

from dogo.engine.config import AugmentConfig  # noqa: E402
from dogo.core.errors import DataError
from dogo.pipelines.base import Shard  # noqa: E402
from dogo.pipelines.convert import ConvertOptions, convert  # noqa: E402
from dogo.pipelines.imagefolder import scan  # noqa: E402
from tests.helpers import dogo, loader_spec, tiny_config, views_of, write_config  # noqa: E402


@pytest.fixture(scope="module")
def beton(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("beton") / "train.beton"
    convert(shapes / "train", out, ConvertOptions(num_workers=1, write_mode="jpg"), log=None)
    return out


def _loader(beton, rank=0, world=1, order="random", batch=16, n_views=2, place="device"):
    from dogo.pipelines.backends.ffcv_loader import FFCVLoader
    spec = loader_spec(16, AugmentConfig(place=place), batch, n_views, seed=5, rank=rank, world=world)
    return FFCVLoader(beton, spec, workers=1, order=order)


@pytest.mark.parametrize("place", ["device", "workers"])
def test_batches_follow_the_shared_order(beton, shapes, place):
    labels = scan(shapes / "train").labels  # the .beton keeps the folder's order
    loader = _loader(beton, n_views=4, place=place)
    shard = Shard(80, 16, 0, 1, 5)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == 5
        for step, batch in enumerate(batches):
            assert len(views_of(batch)) == 4 and all(v.shape == (16, 3, 16, 16) for v in views_of(batch))
            assert all(torch.isfinite(v).all() for v in views_of(batch))
            np.testing.assert_array_equal(batch.labels.numpy(), labels[shard.indices(epoch, step)])
        assert not torch.equal(views_of(batches[0])[0], views_of(batches[0])[1])  # two different crops of each image


def test_two_ranks_split_each_global_batch_and_resume_at_a_step(beton):
    whole = _loader(beton)
    whole.set_epoch(1)
    full = [b.labels for b in whole]
    halves = [_loader(beton, rank=r, world=2) for r in (0, 1)]
    for h in halves:
        h.set_epoch(1, start_step=2)
    parts = [[b.labels for b in h] for h in halves]
    assert len(parts[0]) == 3
    for step in range(3):
        torch.testing.assert_close(torch.cat([parts[0][step], parts[1][step]]), full[step + 2])


def test_quasi_random_covers_every_image_each_epoch(beton):
    loader = _loader(beton, order="quasi_random", batch=8)
    seen = []
    for epoch in (0, 1):
        seen.append(loader.shard.permutation(epoch))
        assert sorted(seen[-1].tolist()) == list(range(80))
    assert not np.array_equal(seen[0], seen[1])
    loader.set_epoch(0)
    assert len(list(loader)) == 10


def test_missing_or_foreign_beton(tmp_path):
    from dogo.pipelines.backends.ffcv_loader import open_beton
    with pytest.raises(DataError, match="dogo convert"):
        open_beton(tmp_path / "none.beton")
    (tmp_path / "junk.beton").write_bytes(b"\0" * 4096)
    with pytest.raises(DataError, match="not a readable .beton"):
        open_beton(tmp_path / "junk.beton")


@pytest.mark.slow
def test_training_run_from_a_beton(beton, shapes, tmp_path):
    cfg = tiny_config(shapes, tmp_path, data={"backend": "ffcv", "ffcv": {"beton": str(beton)}},
                      schedule={"max_steps": 3})
    assert dogo("train", str(write_config(tmp_path / "c.yaml", cfg))) == 0
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in steps)


@pytest.mark.slow
def test_bench_pipeline_writes_all_three_rates(shapes, beton, tmp_path):
    out = tmp_path / "bench.json"
    assert dogo("bench", "pipeline", "--backend", "ffcv", "--data", shapes / "train", "--beton", beton,
                "--size", "24", "--batch", "8", "--batches", "2", "--warmup", "0", "--repeats", "2", "--workers", "1",
                "--device", "cpu", "--json", out) == 0
    r = json.loads(out.read_text())
    rates = {k: r[k]["images_per_s"] for k in ("decode_only_ceiling", "torchvision", "backend_two_views",
                                                "ffcv_decode_only")}
    assert all(v > 0 for v in rates.values()), rates
    assert all(len(r[k]["repeats"]) == 2 for k in rates), "every contender measured in each interleaved pass"
    assert r["ratio_to_torchvision"] == pytest.approx(rates["backend_two_views"] / rates["torchvision"])
    assert r["ratio_to_decode_ceiling"] == pytest.approx(rates["backend_two_views"] / rates["decode_only_ceiling"])
    assert r["images"] == 80 and r["size"] == 24 and r["environment"]["device"] == "cpu"


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory):
    """Random photos-like PNGs of 12 sizes (landscape, portrait, smaller than the views), 2 classes, and their
    lossless .beton."""
    from PIL import Image
    root = tmp_path_factory.mktemp("mixed") / "train"
    rng = np.random.default_rng(7)
    for i in range(24):
        h, w = rng.integers(12, 60, size=2)
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    out = root.parent / "train.beton"
    convert(root, out, ConvertOptions(num_workers=1, write_mode="raw"), log=None)
    return root, out


@pytest.mark.parametrize("place", ["device", "workers"])
def test_views_equal_the_folder_backends_for_the_same_pixels(mixed_sizes, place):
    """Crops, flips and (workers placement) the whole recipe come from the images' streams in both backends: on a
    lossless .beton of images of many sizes the FFCV backend's views are the folder backend's, bit for bit (the
    decoded rows of FFCV's buffer hold each image at its own size)."""
    from dogo.pipelines.backends.folder import FolderLoader
    from dogo.pipelines.backends.ffcv_loader import FFCVLoader
    root, beton = mixed_sizes
    spec = loader_spec(16, AugmentConfig(place=place, blur_p=0.5, solarize_p=0.2), 8, seed=11)
    ffcv = FFCVLoader(beton, spec, workers=2)
    folder = FolderLoader(root, spec, workers=0)
    for epoch in (0, 1):
        ffcv.set_epoch(epoch)
        folder.set_epoch(epoch)
        pairs = list(zip(ffcv, folder))
        assert len(pairs) == 3
        for got, want in pairs:
            torch.testing.assert_close(got.labels, want.labels, rtol=0, atol=0)
            for v in range(2):
                torch.testing.assert_close(views_of(got)[v], views_of(want)[v], rtol=0, atol=0)


def test_a_stock_ffcv_beton_with_other_field_names_and_order(beton, shapes, tmp_path):
    """Stock FFCV scripts name the fields e.g. 'target' and 'img', in any order, with more fields beside them:
    data.ffcv.image_field / data.ffcv.label_field pick them, and the batches equal those of our own .beton."""
    from ffcv.fields import FloatField, IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from PIL import Image

    from dogo.pipelines.backends.ffcv_loader import open_beton

    found = scan(shapes / "train")

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return len(found.paths)

        def __getitem__(self, i):
            return 0.5, int(found.labels[i]), Image.open(found.paths[i]).convert("RGB")

    stock = tmp_path / "stock.beton"
    DatasetWriter(str(stock), {"weight": FloatField(), "target": IntField(), "img": RGBImageField(write_mode="jpg")},
                  num_workers=1).from_indexed_dataset(Samples())
    with pytest.raises(DataError, match="set data.ffcv.image_field"):
        open_beton(stock)
    with pytest.raises(DataError, match="field 'weight' .* is a FloatField"):
        open_beton(stock, "img", "weight")
    from dogo.pipelines.backends.ffcv_loader import FFCVLoader
    theirs = FFCVLoader(stock, loader_spec(16, AugmentConfig(place="device"), 16, seed=5), workers=1,
                        order="quasi_random", image_field="img", label_field="target")
    ours = _loader(beton, order="quasi_random")
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a.labels, b.labels)
        assert views_of(a)[0].shape == views_of(b)[0].shape == (16, 3, 16, 16)


def test_an_epoch_left_early_stops_ffcvs_thread(beton):
    """FFCV's epoch thread is a daemon that keeps decoding ahead; left running, the interpreter's exit kills it as it
    retakes the GIL inside torch's C++ code and the process aborts (exit status 134). Closing our batches waits
    for it."""
    import threading

    from ffcv.loader.epoch_iterator import EpochIterator
    for place in ("device", "workers"):
        loader = _loader(beton, batch=8, place=place)
        loader.set_epoch(0)
        batches = iter(loader)
        next(batches)
        batches.close()
        assert not [t for t in threading.enumerate() if isinstance(t, EpochIterator) and t.is_alive()]


def test_a_beton_declaring_a_huge_image_is_refused_on_open(beton, tmp_path):
    """Issue 32 F4: a .beton whose metadata declares a 60000 x 60000 image made FFCV try to allocate 432 GB (a
    RuntimeError and a traceback); the declared sizes are checked against the pixel limit when the file is opened."""
    import shutil

    from ffcv.reader import Reader

    from dogo.core.errors import DataError
    from dogo.pipelines.backends.ffcv_loader import open_beton
    damaged = tmp_path / "damaged.beton"
    shutil.copy(beton, damaged)
    from ffcv.types import HeaderType
    reader = Reader(str(damaged))
    meta = reader.metadata.copy()
    offset = HeaderType.itemsize + reader.field_descriptors.nbytes  # where FFCV's Reader reads the table
    meta["f0"]["height"][3] = meta["f0"]["width"][3] = 60000
    with open(damaged, "r+b") as f:
        f.seek(offset)
        f.write(meta.tobytes())
    with pytest.raises(DataError, match=r"damaged.beton: sample 3 declares a 60000 x 60000 image, over the"):
        open_beton(damaged)

"""The folder backend and its bad inputs, sharding across world sizes, the batched recipe, the kNN classifier."""
import shutil

import numpy as np
import pytest
import torch

from dogo.engine.config import AugmentConfig
from dogo.engine.eval.evaluate import knn_predict
from dogo.core.errors import DataError
from dogo.pipelines.base import ReusedBuffers, Shard
from dogo.pipelines.backends.folder import FolderLoader
from dogo.pipelines.imagefolder import scan
from tests.helpers import loader_spec, views_of

CPU = torch.device("cpu")
PLACES = ["device", "workers"]


def folder_loader(root, batch=8, n_views=2, rank=0, world=1, place="device", workers=0, **recipe):
    spec = loader_spec(16, AugmentConfig(place=place, **recipe), batch, n_views, rank=rank, world=world)
    return FolderLoader(root, spec, workers=workers)


@pytest.mark.parametrize("place", PLACES)
def test_batches_have_views_on_device_normalised(shapes, place):
    loader = folder_loader(shapes / "train", n_views=4, place=place)
    assert len(loader) == loader.steps_per_epoch == 80 // 8
    batch = next(iter(loader))
    assert len(views_of(batch)) == 4
    for v in views_of(batch):
        assert v.shape == (8, 3, 16, 16) and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert not torch.equal(views_of(batch)[0], views_of(batch)[1])  # two different views of the same images
    assert batch.labels.min() >= 0 and batch.labels.max() < 10


@pytest.mark.parametrize("place", PLACES)
def test_two_ranks_see_exactly_the_global_batch(shapes, place):
    """Whatever the world size and the number of workers, the same images and views (compared in the batch's image
    order: the device recipe may hand a view's rows over in an order of its own)."""
    whole = next(iter(folder_loader(shapes / "train", batch=8, place=place)))
    halves = [next(iter(folder_loader(shapes / "train", batch=8, rank=r, world=2, place=place, workers=w)))
              for r, w in ((0, 1), (1, 0))]
    for v in range(2):
        torch.testing.assert_close(torch.cat([views_of(h)[v] for h in halves]), views_of(whole)[v])
    assert torch.equal(torch.cat([h.labels for h in halves]), whole.labels)


@pytest.mark.parametrize("place", PLACES)
def test_resume_position_skips_the_consumed_steps(shapes, place):
    loader = folder_loader(shapes / "train", place=place)
    loader.set_epoch(2)
    all_steps = list(loader)
    loader.set_epoch(2, start_step=3)
    assert len(loader) == len(all_steps) - 3
    torch.testing.assert_close(views_of(next(iter(loader)))[0], views_of(all_steps[3])[0])


def test_reused_buffers_never_hand_out_memory_still_held():
    """A buffer comes back only once nothing holds its memory: not while a view of it is kept, not while autograd
    keeps it for a backward pass; then it does come back (no new pages to fault in)."""
    pool, shape = ReusedBuffers(keep=3), (4, 3, 8, 8)

    def take():
        out = pool.take(shape, torch.float32, CPU, torch.channels_last)
        assert out.shape == shape and out.is_contiguous(memory_format=torch.channels_last)
        return out

    def address(t):
        return t.untyped_storage().data_ptr()

    first = take().fill_(1)
    kept, first_at = first[1:], address(first)
    del first
    second = take()
    assert address(second) != first_at  # the kept view holds the first buffer
    second_at = address(second)
    del second
    third = take()
    assert address(third) == second_at  # released: reused
    weight = torch.randn(shape, requires_grad=True)
    loss = (third * weight).sum()  # autograd saves `third` for the weight's gradient
    del third
    assert address(take()) not in (first_at, second_at)
    loss.backward()
    del loss
    assert address(take()) == second_at  # autograd let go: reused again
    assert torch.equal(kept, torch.ones_like(kept))


@pytest.mark.parametrize("place", PLACES)
def test_worker_batches_in_reused_memory_equal_a_loader_without_workers(shapes, place):
    """With worker processes on a CPU device, batches are written into shared slots and views into reused
    buffers: every batch of two epochs equals the batch made without workers, both when each batch is dropped at
    once (the memory is reused) and when all of them are kept (none may be overwritten)."""
    reference = []
    for epoch in (0, 1):
        plain = folder_loader(shapes / "train", place=place)
        plain.set_epoch(epoch)
        reference += [[views_of(b)[v] for v in range(2)] + [b.labels] for b in plain]
    for keep in (False, True):
        loader = folder_loader(shapes / "train", place=place, workers=2)
        released = []
        release = loader._slots.release
        loader._slots.release = lambda slot: (released.append(slot), release(slot))
        batches, addresses = [], set()
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            for b in loader:
                made = [views_of(b)[v] for v in range(2)] + [b.labels]
                addresses.add(views_of(b)[0].untyped_storage().data_ptr())
                if keep:
                    batches.append((b, made))
                else:
                    assert all(torch.equal(x, y) for x, y in zip(made, reference[len(released) - 1]))
        assert len(released) == len(reference)  # every batch came through a slot
        if keep:
            for (b, made), expected in zip(batches, reference):
                assert all(torch.equal(x, y) for x, y in zip(made, expected))
                assert torch.equal(views_of(b)[0], expected[0])  # the kept batch itself, after all the others
        else:
            assert len(addresses) < len(reference)  # output buffers were reused


def test_shard_epochs_are_permutations():
    shard = Shard(num_images=20, global_batch=5, rank=0, world_size=1, seed=0)
    seen = np.concatenate([shard.indices(0, s) for s in range(shard.steps_per_epoch)])
    assert sorted(seen) == list(range(20))
    assert not np.array_equal(shard.indices(0, 0), shard.indices(1, 0))


def test_batch_must_divide_over_ranks():
    with pytest.raises(DataError, match="multiple of 3"):
        Shard(num_images=20, global_batch=8, rank=0, world_size=3, seed=0)


def test_missing_path_shows_expected_layout(tmp_path):
    with pytest.raises(DataError, match=r"(?s)does not exist.*ROOT/train/<class_name>"):
        scan(tmp_path / "nope")


def test_empty_dataset(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        scan(tmp_path / "train")
    with pytest.raises(DataError, match="no class folders"):
        scan(tmp_path / "train" / "cat")


def test_class_folder_without_images_warns_and_keeps_labels(shapes, tmp_path):
    root = tmp_path / "train"
    shutil.copytree(shapes / "train", root)
    (root / "aaa_empty").mkdir()
    with pytest.warns(UserWarning, match="aaa_empty"):
        index = scan(root)
    assert index.classes[0] == "aaa_empty" and index.labels.min() == 1


@pytest.mark.parametrize("place", PLACES)
def test_corrupt_images_are_skipped_and_reported(shapes, tmp_path, place):
    root = tmp_path / "train"
    shutil.copytree(shapes / "train", root)
    (root / "circle" / "zero.jpg").write_bytes(b"")
    good = (root / "circle" / "circle_00000.jpg").read_bytes()
    (root / "circle" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "star" / "text.png").write_text("not an image")
    loader = folder_loader(root, batch=8, place=place)
    batches = list(loader)
    assert sum(views_of(b)[0].shape[0] for b in batches) == 8 * loader.steps_per_epoch
    bad = {s.split(":")[0].rsplit("/", 1)[-1] for s in loader.skipped}
    assert bad == {"zero.jpg", "text.png", "truncated.jpg"}


def test_twenty_undecodable_files_in_a_row_are_skipped_not_fatal(shapes, tmp_path):
    """Twenty zero-byte files in one class: each is replaced by the next decodable image and reported, as DALI leaves
    them out and reports them; the run goes on."""
    root = tmp_path / "train"
    shutil.copytree(shapes / "train", root)
    for i in range(20):
        (root / "circle" / f"circle_empty_{i:02d}.jpg").write_bytes(b"")
    loader = folder_loader(root, batch=20)
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch and all(torch.isfinite(views_of(b)[0]).all() for b in batches)
    assert len(loader.skipped) == 20 and all("circle_empty_" in s for s in loader.skipped)


def test_batch_larger_than_dataset(shapes):
    with pytest.raises(DataError, match="data.batch_size=1000 is larger than the 80 images"):
        folder_loader(shapes / "train", batch=1000)


@pytest.mark.parametrize("place", PLACES)
def test_recipe_rates_are_per_image_in_the_views(tmp_path, place):
    """With only one op at a time, the share of views that op changed matches its probability, measured on the
    views a loader makes (crops of the whole image, so that only the op changes pixels)."""
    from PIL import Image
    n = 600
    root = tmp_path / "train"
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(root / f"c{i % 3}" / f"{i:04d}.png")
    off = dict(flip_p=0, jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0, mean=(0, 0, 0), std=(1, 1, 1),
               crop_scale=(1, 1), crop_ratio=(1, 1))
    for key, p in (("grayscale_p", 0.2), ("flip_p", 0.5), ("solarize_p", 0.3)):
        loader = folder_loader(root, batch=n, place=place, **{**off, key: p})
        plain = views_of(next(iter(folder_loader(root, batch=n, place=place, **off))))[0]
        changed = (views_of(next(iter(loader)))[0] - plain).abs().flatten(1).amax(1) > 1e-3
        rate = changed.float().mean().item()
        assert abs(rate - p) < 4.5 * (p * (1 - p) / n) ** 0.5, (key, rate)


def test_knn_predicts_by_weighted_nearest_neighbours():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    scores = knn_predict(bank, labels, queries, num_classes=2, k=3, temperature=0.1)
    assert scores.argmax(1).tolist() == [0, 1]


def test_dataset_check_command(shapes, tmp_path, capsys):
    from dogo.pipelines.check import main
    assert main(["folder", str(shapes)]) == 0
    assert "80 images in 10 classes" in capsys.readouterr().out
    assert main(["folder", str(tmp_path / "imagenet")]) == 2
    assert "ROOT/train/<class_name>" in capsys.readouterr().out


def test_synthetic_backend_makes_this_ranks_rows_only():
    """Each rank draws its own b = B / W images (the synthetic ceiling measures the model, not 8x the pixels), with
    the device recipe's cost; ranks differ, steps differ, a rerun is the same."""
    from dogo.benchmarks.traffic import ByteCounter
    from dogo.pipelines.backends.synthetic import SyntheticLoader

    def loader(rank, world):
        return SyntheticLoader(64, loader_spec(8, AugmentConfig(), 8, seed=1, rank=rank, world=world))
    whole = list(loader(0, 1))
    assert len(whole) == 8 and views_of(whole[0])[0].shape == (8, 3, 8, 8) and not torch.equal(*views_of(whole[0]))
    torch.testing.assert_close(views_of(next(iter(loader(0, 1))))[1], views_of(whole[0])[1])
    halves = [next(iter(loader(r, 2))) for r in range(2)]
    first = [views_of(h)[0] for h in halves]
    assert first[0].shape == (4, 3, 8, 8) and not torch.equal(first[0], first[1])
    with ByteCounter() as one_rank:
        next(iter(loader(0, 1)))
    with ByteCounter() as half:
        next(iter(loader(0, 2)))
    assert half.total < 0.6 * one_rank.total

"""The linear probes: the fast one on features whose classes are linearly separable; the standard one (SGD on
cropped and flipped images through a frozen backbone) learns, is deterministic for a seed and is the same on two gloo
ranks as on one."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from dogo.engine import config as config_mod
from dogo.engine.dist.distributed import DistContext
from dogo.engine.eval.evaluate import topk_accuracy
from dogo.engine.eval.linear import crop_and_flip, fast_probe, standard_probe
from dogo.core.precision import Precision
from dogo.pipelines import open_eval_split
from tests.helpers import gloo_ranks


def test_linear_probe_separates_separable_features():
    """12 classes, so that top-5 is not all of them: separable features are learnt, and features carrying no class
    information stay near chance."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 16, generator=g) * 4

    def sample(n, informative=True):
        y = torch.randint(0, 12, (n,), generator=g)
        return (centres[y] if informative else 0) + torch.randn(n, 16, generator=g), y
    result = fast_probe(*sample(1200), *sample(400), num_classes=12, epochs=20, lr=1e-2)
    assert result["top1"] > 95 and result["top5"] > 99
    chance = fast_probe(*sample(1200, False), *sample(400, False), num_classes=12, epochs=20, lr=1e-2)
    assert chance["top1"] < 20 and chance["top5"] < 60


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(scores, torch.tensor([1, 2, 0]), ks=(1, 2))
    assert abs(acc["top1"] - 100 / 3) < 1e-4 and abs(acc["top2"] - 200 / 3) < 1e-4


def _pooled_pixels() -> nn.Module:
    """A frozen 'backbone' with no weights: 4x4 average-pooled pixels (48 features of a 32 px image)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """A labelled folder whose class is each image's hue (crop-invariant): 6 classes, 16 train and 5 val images each,
    noisy 32 px."""
    from PIL import Image
    root = tmp_path_factory.mktemp("colours")
    g = torch.Generator().manual_seed(0)
    for c in range(6):
        colour = torch.tensor([(c >> 0) & 1, (c >> 1) & 1, (c // 3) % 2], dtype=torch.float32) * 160 + 40
        for split, n in (("train", 16), ("val", 5)):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                pixels = (colour.view(1, 1, 3) + 40 * torch.randn(32, 32, 3, generator=g)).clamp(0, 255)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / split / f"c{c}" / f"{i}.png")
    return root


def _probe(data, rank=0, world=1, seed=0, epochs=8):
    cfg = config_mod.load(None, [f"data.path={data}", "data.workers=0", "device=cpu", "data.image_size=32",
                                  "objective.name=simclr"])
    splits = [open_eval_split(cfg.data, s, 0) for s in ("train", "val")]
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    return standard_probe(_pooled_pixels(), *splits, recipe=cfg.augment, ctx=ctx,
                          precision=Precision(torch.float32, False), epochs=epochs, batch_size=16, seed=seed)


def test_standard_probe_learns_and_is_deterministic(colours):
    """Pooled pixels carry each image's colour, its class: the probe learns it (chance is 1 in 6); the same seed
    gives the same classifier, another seed other crops and another classifier."""
    a, b = _probe(colours), _probe(colours)
    assert a == b
    assert a["top1"] > 80, a


def test_crop_and_flip_draws_per_image_and_keeps_shape():
    x = torch.rand(4, 3, 16, 16)
    out = crop_and_flip(x, torch.arange(4).numpy(), seed=0, epoch=0)
    assert out.shape == x.shape and not torch.equal(out, x)
    # image 2's crop does not depend on which other images share its batch
    alone = crop_and_flip(x[2:3], torch.tensor([2]).numpy(), seed=0, epoch=0)
    torch.testing.assert_close(alone[0], out[2])


def _probe_on_rank(rank, world, port, data, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = _probe(data, rank, world, epochs=4)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_standard_probe_on_two_gloo_ranks_equals_one(colours):
    out = gloo_ranks(_probe_on_rank, 2, colours)
    one = _probe(colours, epochs=4)
    for rank in (0, 1):
        for k in one:  # the gradients' sums differ in order only: the same predictions up to an image
            assert abs(out[rank][k] - one[k]) <= 100 / 30 + 1e-6, (rank, out[rank], one)

"""The DALI backend in CPU mode (device_id=None): batches, order, sharding and resume as the other backends; the
recipe's rates and ranges, measured on images whose every change can be seen; bad files; a DoGo run."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from dogo.engine.config import AugmentConfig  # noqa: E402
from dogo.pipelines.base import Shard  # noqa: E402
from dogo.pipelines.backends.dali_loader import DALILoader  # noqa: E402
from tests.helpers import dogo, loader_spec, tiny_config, views_of, write_config  # noqa: E402

CPU = torch.device("cpu")
OFF = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, flip_p=0.0, crop_scale=(1.0, 1.0),
           crop_ratio=(1.0, 1.0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # views are the image / 255


def _loader(root, recipe, *, batch=50, n_views=1, size=16, rank=0, world=1, seed=0, dtype=torch.float32):
    return DALILoader(root, loader_spec(size, recipe, batch, n_views, seed=seed, rank=rank, world=world, dtype=dtype),
                      workers=2)


def _folder(tmp_path, name, pixels: np.ndarray, copies=100, classes=2):
    """`copies` PNG files of one (H, W, 3) uint8 image, spread over class folders."""
    root = tmp_path / name
    for i in range(copies):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(d / f"{i:04d}.png")
    return root


def _views(loader, epochs):
    out = []
    for e in range(epochs):
        loader.set_epoch(e)
        out += [views_of(b)[0] for b in loader]
    return torch.cat(out) * 255  # back to pixel values (mean 0, std 1 in OFF)


def _rate_ok(hits: torch.Tensor, p: float):
    n = hits.numel()
    assert abs(hits.float().mean().item() - p) < 4.5 * (p * (1 - p) / n) ** 0.5 + 1e-9, (hits.float().mean(), p)


def test_batches_follow_the_shard_and_resume(shapes):
    root = shapes / "train"
    recipe = AugmentConfig()
    loader = _loader(root, recipe, batch=16, n_views=4, size=24)
    shard = Shard(80, 16, 0, 1, 0)
    assert len(loader) == loader.steps_per_epoch == 5
    index = loader.index
    lo = torch.tensor([(0 - m) / s for m, s in zip(recipe.mean, recipe.std)]).view(1, 3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(recipe.mean, recipe.std)]).view(1, 3, 1, 1)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == 5
    for step, b in enumerate(batches):
        assert len(views_of(b)) == 4
        for v in views_of(b):
            assert v.shape == (16, 3, 24, 24) and v.dtype == torch.float32 and v.device == CPU
            assert (v >= lo - 1e-4).all() and (v <= hi + 1e-4).all()
        assert torch.equal(b.labels, torch.from_numpy(index.labels[shard.indices(1, step)]))
        assert not torch.equal(views_of(b)[0], views_of(b)[1])  # two different views of each image
    loader.set_epoch(1, start_step=3)  # resume: the rest of the epoch only
    rest = list(loader)
    assert [b.labels.tolist() for b in rest] == [b.labels.tolist() for b in batches[3:]]
    # two ranks split each global batch as the other backends do
    for rank in range(2):
        half = _loader(root, recipe, batch=16, size=24, rank=rank, world=2)
        half.set_epoch(1)
        for step, b in enumerate(half):
            assert torch.equal(b.labels, torch.from_numpy(index.labels[Shard(80, 16, rank, 2, 0).indices(1, step)]))
    bf16 = _loader(root, recipe, batch=16, size=24, dtype=torch.bfloat16)
    assert views_of(next(iter(bf16)))[0].dtype == torch.bfloat16


def test_flip_and_grayscale_rates(tmp_path):
    img = np.zeros((16, 16, 3), np.uint8)
    img[:, :8] = (200, 40, 40)  # red left half, blue right half
    img[:, 8:] = (40, 40, 200)
    root = _folder(tmp_path, "halves", img)
    x = _views(_loader(root, AugmentConfig(**{**OFF, "flip_p": 0.5, "grayscale_p": 0.2})), epochs=10)
    gray = (x[:, 0] - x[:, 2]).abs().amax(dim=(1, 2)) < 1.5
    _rate_ok(gray, 0.2)
    colour = x[~gray]
    flipped = colour[:, 2, :, :4].mean(dim=(1, 2)) > colour[:, 0, :, :4].mean(dim=(1, 2))  # blue on the left
    _rate_ok(flipped, 0.5)
    # a grey output carries the ITU-R 601 luma of the colour, as torchvision's rgb_to_grayscale
    red, blue = 0.299 * 200 + 0.587 * 40 + 0.114 * 40, 0.299 * 40 + 0.587 * 40 + 0.114 * 200
    sides = torch.stack([x[gray][:, 0, :, :4].mean(dim=(1, 2)), x[gray][:, 0, :, 12:].mean(dim=(1, 2))], 1)
    assert ((sides.sort(dim=1).values - torch.tensor([blue, red])).abs() < 2).all()


def test_jitter_rate_and_brightness_range(tmp_path):
    root = _folder(tmp_path, "grey", np.full((16, 16, 3), 100, np.uint8))
    recipe = AugmentConfig(**{**OFF, "jitter_p": 0.8, "brightness": 0.4, "contrast": 0.0, "saturation": 0.0,
                              "hue": 0.0})
    x = _views(_loader(root, recipe), epochs=10)
    factor = x.mean(dim=(1, 2, 3)) / 100  # uniform grey: brightness is the only visible change
    changed = (factor - 1).abs() > 0.006
    _rate_ok(changed, 0.8)
    f = factor[changed]
    assert f.min() >= 0.6 - 0.01 and f.max() <= 1.4 + 0.01
    assert f.min() < 0.7 and f.max() > 1.3  # the whole range is drawn
    assert abs(f.mean().item() - 1.0) < 0.04  # uniform around 1


def test_blur_and_solarize_rates(tmp_path):
    stripes = np.zeros((32, 32, 3), np.uint8)
    stripes[:, ::4] = 230  # thin bright lines: any blur with sigma >= 1 dims them
    root = _folder(tmp_path, "stripes", stripes)
    recipe = AugmentConfig(**{**OFF, "blur_p": 0.5, "blur_sigma": (1.0, 2.0), "blur_kernel_fraction": 0.2})
    x = _views(_loader(root, recipe, size=32), epochs=10)
    peak = x.amax(dim=(1, 2, 3))
    _rate_ok(peak < 200, 0.5)
    root = _folder(tmp_path, "bright", np.full((16, 16, 3), 200, np.uint8))
    x = _views(_loader(root, AugmentConfig(**{**OFF, "solarize_p": 0.3})), epochs=10)
    value = x.mean(dim=(1, 2, 3))
    assert set(value.round().unique().tolist()) <= {55.0, 200.0}  # 255 - 200 where solarised
    _rate_ok(value.round() == 55, 0.3)


def test_undecodable_files_are_left_out_and_reported(shapes, tmp_path):
    """Truncated, foreign and empty files never reach DALI (its CPU decoder can crash on them); nor do a JPEG whose
    markers are intact but whose data is corrupt (DALI would train on garbage with only a warning), a PNG that
    declares 30000 x 30000 pixels (DALI would decode 8.9 GB) or a file whose name is not UTF-8 (DALI's reader
    cannot open it): each is left out and reported with its reason, before the first batch."""
    import os
    import shutil

    from tests.test_images import _png_declaring
    root = tmp_path / "train"
    shutil.copytree(shapes / "train", root)
    files = sorted((root / "circle").iterdir())
    files[0].write_bytes(files[0].read_bytes()[:200])  # truncated JPEG
    files[1].write_bytes(np.random.default_rng(0).bytes(3000))  # not an image
    files[2].write_bytes(b"")
    good = bytearray(files[3].read_bytes())
    mid, n = len(good) // 2, len(good) // 3  # random bytes over a third of a small JPEG, before its end marker
    good[mid:mid + n] = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).tobytes()
    files[4].write_bytes(bytes(good))  # corrupt data, markers intact
    files[5].write_bytes(_png_declaring(30000, 30000))
    os.rename(files[6], os.fsencode(str(root / "circle")) + b"/not-utf8-\xff.jpg")
    loader = _loader(root, AugmentConfig(), batch=18, size=16)
    assert len(loader.index) == 74 and loader.steps_per_epoch == 4, loader.skipped
    reasons = dict(s.split(": ", 1) for s in loader.skipped)
    left_out = [files[0], files[1], files[2], files[4], files[5]]  # files[3] is the corrupt one's whole original
    assert sorted(reasons) == sorted([str(f) for f in left_out] + [str(root / "circle" / "not-utf8-\ufffd.jpg")])
    assert "corrupt" in reasons[str(files[4])] and "30000 x 30000" in reasons[str(files[5])]
    assert "not valid UTF-8" in reasons[str(root / "circle" / "not-utf8-\ufffd.jpg")]
    batches = list(loader)
    assert len(batches) == 4 and batches[0].skipped == loader.skipped and not batches[1].skipped
    assert str(files[3]) in loader.index.paths  # whole files stay


@pytest.mark.slow
def test_dogo_trains_from_the_dali_backend(shapes, tmp_path):
    cfg = tiny_config(shapes, tmp_path / "runs", data={"backend": "dali", "workers": 2},
                      schedule={"max_steps": 3})
    assert dogo("train", str(write_config(tmp_path / "c.yaml", cfg))) == 0
    records = [json.loads(line) for line in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in steps)
    assert any(r.get("event") == "done" for r in records)


@pytest.mark.slow
def test_bench_pipeline_dali(shapes, tmp_path):
    import json
    out = tmp_path / "bench.json"
    assert dogo("bench", "pipeline", "--backend", "dali", "--data", shapes / "train", "--size", "24", "--batch", "8",
                "--batches", "2", "--warmup", "1", "--repeats", "1", "--workers", "1", "--device", "cpu",
                "--json", out) == 0
    r = json.loads(out.read_text())
    assert r["backend"] == "dali" and r["backend_two_views"]["images_per_s"] > 0
    assert r["ratio_to_torchvision"] == pytest.approx(r["backend_two_views"]["images_per_s"]
                                                      / r["torchvision"]["images_per_s"])


# Every option of the recipe that changes the graph: probabilities at 0 leave ops out, strengths at 0 make the
# jitter an identity, and fp16 output changes crop_mirror_normalize.
GPU_GRAPH_RECIPES = [
    {},
    dict(blur_p=0.5, solarize_p=0.2, grayscale_p=0.2),
    dict(blur_p=0.0, solarize_p=0.0, grayscale_p=0.0, jitter_p=0.0),
    dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0),
    dict(brightness=0.4, contrast=0.0, hue=0.0),
]


@pytest.mark.parametrize("recipe", GPU_GRAPH_RECIPES)
@pytest.mark.parametrize("out_dtype", ["FLOAT", "FLOAT16"])
def test_the_gpu_graph_is_defined_for_every_recipe_option(recipe, out_dtype):
    """DALI checks where each argument lives when the graph is defined, before anything runs: the mixed (GPU)
    decoder's graph can be defined on this CPU machine. Named arguments must be CPU tensors; a GPU one (such as the
    image mean as contrast_center) is refused here, as it would be on a GPU."""
    from nvidia.dali import types

    from dogo.pipelines.backends.dali_loader import _views
    plan = loader_spec(32, AugmentConfig(**recipe)).plan
    pipe = _views(files=["unused.jpg"], labels=[0], plan=plan, decoder="mixed", hw_decoder_load=0.65,
                  out_dtype=getattr(types, out_dtype), batch_size=2, num_threads=1, device_id=0, seed=1,
                  prefetch_queue_depth=2)
    devices = [o.device for o in pipe._graph_out]  # the defined graph's outputs (DALI 2.4 keeps them here)
    assert devices == ["gpu", "gpu", "cpu"], devices  # both views made on the GPU; the labels from the reader


def test_contrast_and_brightness_as_arithmetic_match_torchvision(tmp_path):
    """The arithmetic form of brightness and contrast around the mean grey: brightness b, contrast c with
    b * (m + c (x - m)) equals torchvision's adjust_contrast then adjust_brightness (no clamp in between here)."""
    from torchvision.transforms.v2 import functional as TF
    rng = np.random.default_rng(0)
    pixels = rng.integers(60, 190, (16, 16, 3), dtype=np.uint8)
    root = _folder(tmp_path, "c", pixels, copies=40)
    recipe = AugmentConfig(**{**OFF, "jitter_p": 1.0, "brightness": 0.2, "contrast": 0.2, "saturation": 0.0,
                              "hue": 0.0})
    got = _views(_loader(root, recipe, batch=40), 1)
    x = torch.from_numpy(pixels).permute(2, 0, 1)
    mean_grey = TF.rgb_to_grayscale(x.float() / 255).mean()
    # each view's b and c are unknown, but every pixel satisfies y = k0 + k1 x with k1 = b c, k0 = b m (1 - c):
    for view in got[:8]:
        xs, ys = x.float().flatten(), view.flatten()
        k1, k0 = np.polyfit(xs.numpy(), ys.numpy(), 1)
        b = k1 + k0 / (255 * mean_grey.item())  # b c + b (1 - c) = b
        c = k1 / b
        assert 0.8 - 0.02 <= b <= 1.2 + 0.02 and 0.8 - 0.02 <= c <= 1.2 + 0.02, (b, c)
        want = TF.adjust_brightness(TF.adjust_contrast(x.float() / 255, c), b) * 255
        assert (want.clamp(0, 255).round() - view).abs().max() <= 1.01


def test_dali_out_of_memory_names_the_step_and_the_settings(shapes):
    loader = _loader(shapes / "train", AugmentConfig(), batch=8)
    err = loader._explain(RuntimeError("Critical error in pipeline:\nCUDA allocation failed: out of memory"), 0, 5)
    assert "ran out of device memory at step 5 of epoch 0" in str(err) and "data.batch_size" in str(err)


def test_a_plan_of_two_sizes_with_a_view_of_its_own_recipe(shapes):
    """Every group of the plan at its size, each view with its own recipe: a large view whose recipe takes the
    whole frame and changes nothing is the same in every epoch, its random sibling is not."""
    from dogo.engine.config.schema import RecipeOverrides, ViewGroup
    from dogo.pipelines import LoaderSpec
    from dogo.pipelines.views import plan_of
    recipe = AugmentConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    still = RecipeOverrides(**{k: v for k, v in OFF.items() if k not in ("mean", "std")})
    views = {"global": ViewGroup(count=2, view_recipe={"1": still}), "local": ViewGroup(count=3, size=12)}
    spec = LoaderSpec(plan=plan_of(recipe, views, 24, sets=1), recipe=recipe, global_batch=16, seed=3)
    loader = DALILoader(shapes / "train", spec, workers=2)
    epochs = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        epochs.append(next(iter(loader)))
    for b in epochs:
        assert [g.shape for g in b.groups] == [(32, 3, 24, 24), (48, 3, 12, 12)]
        assert all(torch.isfinite(g).all() for g in b.groups)
    (a0, a1), (b0, b1) = (e.groups[0].split(16) for e in epochs)  # each epoch's order: compared by image
    order = [torch.from_numpy(loader.shard.indices(e, 0)) for e in (0, 1)]
    common = [i for i in order[0].tolist() if i in order[1].tolist()]
    rows = [[o.tolist().index(i) for i in common] for o in order]
    assert common and torch.allclose(a1[rows[0]], b1[rows[1]], atol=1e-6)  # the still view: the frame each epoch
    assert not torch.allclose(a0[rows[0]], b0[rows[1]], atol=1e-3)  # the random view: another crop each epoch

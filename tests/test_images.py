"""One image loader for every backend and for `dogo convert`: the same pixels from the same files (EXIF rotation,
16-bit, CMYK, palette and grey images), and broken files refused before they are decoded where that matters."""
import io
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from dogo.pipelines import images
from dogo.pipelines.images import load_rgb, structural_problem

RNG = np.random.default_rng(0)


def _photo(h=40, w=56):
    """Smooth content (JPEG keeps it close), so that orientation errors show."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (h + w)], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    """Files whose decoding is easy to get wrong, with the pixels each must give."""
    d = tmp_path_factory.mktemp("awkward")
    rgb = _photo()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(d / "rotated.jpg", quality=95, exif=exif)
    Image.fromarray(rgb).save(d / "plain.jpg", quality=95)
    grey16 = (np.arange(40 * 56).reshape(40, 56) * 29).astype(np.uint16)
    Image.fromarray(grey16).save(d / "grey16.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(d / "alpha.png")
    Image.fromarray(rgb[..., 0]).save(d / "grey.jpg", quality=95)
    return d


def test_exif_rotation_is_applied(awkward):
    plain, rotated = load_rgb(str(awkward / "plain.jpg")), load_rgb(str(awkward / "rotated.jpg"))
    assert rotated.shape == (56, 40, 3)
    np.testing.assert_allclose(rotated.astype(float), np.rot90(plain, -1).astype(float), atol=3)


def test_16_bit_grey_is_scaled_not_clipped(awkward):
    got = load_rgb(str(awkward / "grey16.png"))
    want = np.rint(np.asarray(Image.open(awkward / "grey16.png"), dtype=np.float64) / 257).astype(np.uint8)
    np.testing.assert_array_equal(got[..., 0], want)
    assert abs(got.mean() - want.mean()) < 1e-9 and got.mean() < 200  # not whitened (a clipped 16-bit PNG: ~254)


@pytest.mark.parametrize("name", ["plain.jpg", "cmyk.jpg", "palette.png", "alpha.png", "grey.jpg", "rotated.jpg"])
def test_the_fast_jpeg_path_gives_pils_pixels(awkward, name):
    """Every file as PIL gives it (EXIF transposed, converted to RGB as ImageFolder's loader does): the JPEGs that
    go through torchvision's decoder bit for bit."""
    from PIL import ImageOps
    with Image.open(awkward / name) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(load_rgb(str(awkward / name)), want)


def test_every_backend_and_convert_read_the_same_pixels(awkward, tmp_path):
    """The folder backend's evaluation images and training crops (whole-image crop, no recipe), and the .beton that
    `dogo convert` writes, hold load_rgb's pixels."""
    from dogo.engine.config import AugmentConfig
    from dogo.pipelines.recipe.cpu import crop_and_flip
    from dogo.pipelines.backends.folder import FolderEvalSplit
    root = tmp_path / "split" / "a"
    root.mkdir(parents=True)
    for name in ("rotated.jpg", "grey16.png", "cmyk.jpg"):
        (root / name).write_bytes((awkward / name).read_bytes())
    split = FolderEvalSplit(tmp_path / "split", 32, workers=0)
    ident = AugmentConfig(mean=(0, 0, 0), std=(1, 1, 1))
    (x, y), = split.batches(np.arange(3), 8, torch.device("cpu"), ident, torch.float32, False)
    for k, path in enumerate(split.index.paths):
        want = Image.fromarray(load_rgb(path))
        s = round(32 / 0.875) / min(want.size)
        w, h = max(32, round(want.width * s)), max(32, round(want.height * s))
        want = np.asarray(want.resize((w, h), Image.BILINEAR))[(h - 32) // 2:(h - 32) // 2 + 32,
                                                               (w - 32) // 2:(w - 32) // 2 + 32]
        np.testing.assert_allclose(x[k].permute(1, 2, 0).numpy() * 255, want, atol=1e-3)
        image = load_rgb(path)
        crop = crop_and_flip(image, (0, 0, image.shape[1], image.shape[0]), False, image.shape[0])
        assert crop.shape[0] == image.shape[0]
    ffcv = pytest.importorskip("ffcv")  # noqa: F841
    from ffcv.reader import Reader

    from dogo.pipelines.convert import ConvertOptions, convert
    out = tmp_path / "a.beton"
    convert(tmp_path / "split", out, ConvertOptions(num_workers=1, write_mode="raw"), log=None)
    reader = Reader(str(out))
    assert reader.num_samples == 3
    for k, path in enumerate(sorted(split.index.paths)):
        meta = reader.metadata["f0"][k]
        assert (int(meta["height"]), int(meta["width"])) == load_rgb(path).shape[:2]


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's shape): 875 kB in the issue, a few
    bytes here; nothing decodes it."""
    def chunk(kind, body):
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def test_broken_files_are_found_without_decoding(awkward, tmp_path):
    buffer = io.BytesIO()
    Image.fromarray((RNG.random((300, 400, 3)) * 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    good = buffer.getvalue()  # mostly entropy-coded data, as photos are
    corrupt = bytearray(good)
    corrupt[len(good) // 2:len(good) // 2 + 600] = RNG.integers(0, 256, 600, dtype=np.uint8).tobytes()
    cases = {"bomb.png": _png_declaring(30000, 30000), "corrupt.jpg": bytes(corrupt),
             "truncated.jpg": good[:len(good) // 2], "empty.jpg": b"", "text.jpg": b"not an image at all"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    assert structural_problem(str(awkward / "plain.jpg")) is None
    assert structural_problem(str(awkward / "alpha.png")) is None
    assert "declares 30000 x 30000" in structural_problem(str(tmp_path / "bomb.png"))
    assert "corrupt image data" in structural_problem(str(tmp_path / "corrupt.jpg"))
    assert "truncated" in structural_problem(str(tmp_path / "truncated.jpg"))
    assert structural_problem(str(tmp_path / "empty.jpg")) == "zero-byte file"
    assert structural_problem(str(tmp_path / "text.jpg")) == "not a JPEG or PNG"
    assert structural_problem(str(tmp_path / "corrupt.jpg"), whole=False) is None  # ends only: corruption unseen
    with pytest.raises(images.TooManyPixels, match="900000000 pixels"):  # the loader refuses it from the header too
        load_rgb(str(tmp_path / "bomb.png"))
    with pytest.raises(images.DECODE_ERRORS):
        load_rgb(str(tmp_path / "corrupt.jpg"))


def test_many_files_at_once_give_load_rgbs_pixels_and_refusals(awkward, tmp_path):
    """load_many (the held backend's decode of a whole folder): each file's load_rgb image, or the line load_rgb's
    refusal gives; a JPEG whose data makes libjpeg warn mid-list is still found and named."""
    buffer = io.BytesIO()
    Image.fromarray((RNG.random((64, 64, 3)) * 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    good = buffer.getvalue()
    # zeroed entropy-coded data: no structural problem, but libjpeg warns "Corrupt JPEG data" when decoding it
    start = good.index(b"\xff\xda") + 200
    zeroed = good[:start] + bytes(len(good) - start - 300) + good[-300:]
    (tmp_path / "zeroed.jpg").write_bytes(zeroed)
    (tmp_path / "truncated.jpg").write_bytes(good[:len(good) // 2])
    (tmp_path / "good.jpg").write_bytes(good)
    paths = [str(awkward / n) for n in ("plain.jpg", "cmyk.jpg", "palette.png", "grey.jpg", "rotated.jpg")] + \
        [str(tmp_path / n) for n in ("zeroed.jpg", "good.jpg", "truncated.jpg")]
    for path, got in zip(paths, images.load_many(paths)):
        try:
            want = load_rgb(path)
        except images.DECODE_ERRORS as exc:
            assert got == images.skip_line(path, exc), path
        else:
            np.testing.assert_array_equal(got, want, err_msg=path)
    assert isinstance(images.load_many(paths[-3:])[0], str)  # the zeroed JPEG: refused, by name

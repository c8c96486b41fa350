"""dogo convert: an image-folder tree to .beton, with every kind of awkward file."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

ffcv = pytest.importorskip("ffcv", reason="the ffcv extra is not installed")

from dogo.pipelines.base import DataError  # noqa: E402
from dogo.pipelines.convert import ConvertOptions, convert, sidecar  # noqa: E402


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _noise(w, h, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.fixture()
def awkward_tree(tmp_path):
    """Two classes; 'a' holds plain and awkward-but-decodable files, 'b' holds the undecodable ones beside good ones.
    Returns the root and, per file name, the (height, width) it must be stored at (None: must be skipped)."""
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    expect = {}
    _noise(40, 30, 0).save(root / "a" / "plain.jpg", quality=95); expect["plain.jpg"] = (30, 40)
    _noise(24, 24, 1, "CMYK").save(root / "a" / "cmyk.jpg"); expect["cmyk.jpg"] = (24, 24)
    _noise(20, 16, 2, "L").save(root / "a" / "grey.png"); expect["grey.png"] = (16, 20)
    rgba = _noise(18, 12, 3, "RGBA")
    rgba.putalpha(128)
    rgba.save(root / "a" / "alpha.png"); expect["alpha.png"] = (12, 18)
    sixteen = Image.fromarray((np.arange(10 * 14).reshape(10, 14) * 400).astype(np.uint16))
    sixteen.save(root / "a" / "sixteen.png"); expect["sixteen.png"] = (10, 14)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored 40x20 (w x h) image is shown rotated, 20 wide and 40 high
    (root / "a" / "rotated.jpg").write_bytes(_jpeg_bytes(_noise(40, 20, 4), exif=exif)); expect["rotated.jpg"] = (40, 20)
    _noise(3000, 2000, 5).save(root / "a" / "huge.jpg", quality=80); expect["huge.jpg"] = (64, 96)  # max-res 96
    _noise(32, 32, 6).save(root / "b" / "good.jpg"); expect["good.jpg"] = (32, 32)
    whole = _jpeg_bytes(_noise(64, 48, 7))
    (root / "b" / "truncated.jpg").write_bytes(whole[:len(whole) // 2]); expect["truncated.jpg"] = None
    (root / "b" / "empty.jpg").write_bytes(b""); expect["empty.jpg"] = None
    (root / "b" / "notes.png").write_text("not an image at all"); expect["notes.png"] = None
    corrupt = bytearray(whole)
    corrupt[2:200] = os.urandom(198)
    (root / "b" / "corrupt.jpg").write_bytes(bytes(corrupt)); expect["corrupt.jpg"] = None
    return root, expect


def _stored(dst):
    from ffcv.reader import Reader
    reader = Reader(str(dst))
    meta = reader.metadata  # fields in the writer's order: f0 the image, f1 the label
    return reader, meta["f0"]["height"], meta["f0"]["width"], meta["f1"]


def test_convert_stores_what_decodes_and_reports_the_rest(awkward_tree, tmp_path):
    root, expect = awkward_tree
    dst = tmp_path / "out" / "train.beton"
    dst.parent.mkdir()
    report = convert(root, dst, ConvertOptions(max_resolution=96, num_workers=2, chunk_size=3), log=None)
    good = sorted((p for p, hw in expect.items() if hw), key=lambda n: ("a" if n != "good.jpg" else "b", n))
    reader, heights, widths, labels = _stored(dst)
    assert reader.num_samples == len(good) == report["images_written"]
    assert sorted(zip(heights.tolist(), widths.tolist())) == sorted(expect[n] for n in good)
    assert labels.tolist() == [0] * (len(good) - 1) + [1]  # sorted class folders: a -> 0, b -> 1
    skipped = {os.path.basename(s["path"]): s["reason"] for s in json.loads(sidecar(dst, "report").read_text())[
        "skipped_files"]}
    assert set(skipped) == {n for n, hw in expect.items() if hw is None}
    assert skipped["empty.jpg"] == "zero-byte file" and "truncated" in skipped["truncated.jpg"]
    classes = json.loads(sidecar(dst, "classes").read_text())
    assert classes["classes"] == ["a", "b"] and classes["images_per_class"] == [len(good) - 1, 1]
    assert not dst.with_name("train.beton.partial").exists()


def test_raw_pixels_round_trip(tmp_path):
    root = tmp_path / "src" / "c"
    root.mkdir(parents=True)
    img = _noise(17, 9, 11)
    img.save(root / "x.png")
    dst = tmp_path / "x.beton"
    convert(tmp_path / "src", dst, ConvertOptions(num_workers=1), log=None)
    reader, h, w, _ = _stored(dst)
    ptr = int(reader.metadata["f0"]["data_ptr"][0])
    pixels = np.fromfile(dst, dtype=np.uint8, count=9 * 17 * 3, offset=ptr).reshape(9, 17, 3)
    np.testing.assert_array_equal(pixels, np.asarray(img))


def test_strict_names_the_first_bad_file(awkward_tree, tmp_path):
    root, _ = awkward_tree
    dst = tmp_path / "strict.beton"
    with pytest.raises(DataError, match=r"(truncated|empty|notes|corrupt)\.(jpg|png).*--strict"):
        convert(root, dst, ConvertOptions(strict=True, num_workers=1), log=None)
    assert not dst.exists() and not dst.with_name("strict.beton.partial").exists()


def test_existing_output_is_kept_and_leftovers_are_cleaned(awkward_tree, tmp_path):
    root, _ = awkward_tree
    dst = tmp_path / "keep.beton"
    dst.write_bytes(b"precious")
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        convert(root, dst, ConvertOptions(num_workers=1), log=None)
    assert dst.read_bytes() == b"precious"
    leftover = dst.with_name("keep.beton.partial")
    leftover.write_bytes(b"half a conversion")
    convert(root, dst, ConvertOptions(num_workers=1, write_mode="jpg", max_resolution=64), overwrite=True, log=None)
    assert not leftover.exists() and _stored(dst)[0].num_samples == 8


@pytest.mark.parametrize("bad,match", [({"write_mode": "png"}, "--write-mode"), ({"jpeg_quality": 0}, "--jpeg-quality"),
                                       ({"max_resolution": 0}, "--max-resolution")])
def test_bad_options_are_named(awkward_tree, tmp_path, bad, match):
    with pytest.raises(DataError, match=match):
        convert(awkward_tree[0], tmp_path / "o.beton", ConvertOptions(**bad), log=None)


def test_cli_convert_interrupted_leaves_nothing(shapes, tmp_path):
    """SIGKILL in the middle of writing: nothing under DST; a rerun starts clean and completes."""
    import signal
    import subprocess
    import sys
    import time
    from tests.conftest import REPO, cli_env, run_cli
    dst = tmp_path / "shapes.beton"
    proc = subprocess.Popen([sys.executable, "-m", "dogo", "convert", str(shapes / "train"), str(dst),
                             "--num-workers", "1", "--chunk-size", "1", "--write-mode", "jpg"],
                            env=cli_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    partial = dst.with_name("shapes.beton.partial")
    deadline = time.time() + 60
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dst.exists()
    out = run_cli("convert", str(shapes / "train"), str(dst), "--num-workers", "1")
    assert "wrote 80 images of 10 classes" in out.stdout
    assert dst.exists() and not partial.exists()

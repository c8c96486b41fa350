"""Photo JPEGs of about ImageNet's typical size (500x375) for the pipeline benchmark, on machines without ImageNet.

The sources are the colour photographs that ship inside scikit-image's wheel (astronaut, coffee, chelsea, rocket,
motorcycle, retina, IHC, Hubble deep field), fetched from the package registry with `pip download` (no install).
Each output image is a random crop of one of them (area 30-100%, ImageNet-like aspect), resized to 500x375 or
375x500 and saved as a quality-90 JPEG: real photographic content, so decoding costs what photos cost, though
there are only a few scenes. Written to OUT.partial and renamed when complete.

    python -m dogo.benchmarks.lab.photos data/photos500 --images 2000
"""
from __future__ import annotations

import argparse
import glob
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

SOURCES = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
           "motorcycle_right.png", "retina.jpg", "ihc.png", "hubble_deep_field.jpg"]


def installed_sources() -> dict[str, Image.Image] | None:
    """The same photos from an installed scikit-image (no network: a GPU machine often has it), or None."""
    try:
        import skimage
    except ImportError:
        return None
    folder = Path(skimage.__file__).parent / "data"
    if not all((folder / name).is_file() for name in SOURCES):
        return None
    return {name: Image.open(folder / name).convert("RGB") for name in SOURCES}


def fetch_sources() -> dict[str, Image.Image]:
    installed = installed_sources()
    if installed is not None:
        return installed
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, "scikit-image"]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit("error: could not fetch the scikit-image wheel with pip (its photos are the sources)")
        wheel = glob.glob(f"{tmp}/*.whl")[0]
        with zipfile.ZipFile(wheel) as z:
            return {name: Image.open(io.BytesIO(z.read(f"skimage/data/{name}"))).convert("RGB") for name in SOURCES}


def make(out: Path, images: int, seed: int) -> Path:
    sources = list(fetch_sources().items())
    rng = np.random.default_rng(seed)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for i in range(images):
        k = i % len(sources)
        name, src = sources[k]
        landscape = rng.random() < 0.75
        w_out, h_out = (500, 375) if landscape else (375, 500)
        area = rng.uniform(0.3, 1.0) * src.width * src.height
        aspect = (w_out / h_out) * np.exp(rng.uniform(-0.1, 0.1))
        w = int(min(src.width, np.sqrt(area * aspect)))
        h = int(min(src.height, w / aspect))
        left, top = int(rng.integers(0, src.width - w + 1)), int(rng.integers(0, src.height - h + 1))
        img = src.crop((left, top, left + w, top + h)).resize((w_out, h_out), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        folder = partial / "train" / name.split(".")[0]
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:06d}.jpg", quality=90)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = make(Path(a.out), a.images, a.seed)
    print(f"wrote {a.images} photo JPEGs to {out}/train")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

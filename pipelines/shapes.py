"""The embedded default dataset: procedural shapes and textures, written as JPEGs in the image-folder layout.

Ten classes whose identity survives random crops and colour changes: five filled shapes (circle, square,
triangle, star, cross) at random position, size and colours, and five textures (stripes, checkerboard,
dots, waves, rings) at random period, phase and colours; each class keeps one orientation (within 10 degrees). Deterministic for a given seed. The whole
tree is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "star", "cross", "stripes", "checker", "dots", "waves", "rings")


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours that differ enough in luma to be told apart in grayscale too."""
    while True:
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        luma = np.array([0.299, 0.587, 0.114])
        if abs(float((a - b) @ luma)) > 60:
            return a, b


def _orientation(rng: np.random.Generator) -> float:
    """Upright within +-10 degrees: the recipe makes views invariant to crops, flips and colour, not to rotation,
    so a class keeps one orientation (as photographs mostly do)."""
    return math.radians(rng.uniform(-10, 10))


def _polygon(cx, cy, radius, n, rotation, inner=None):
    pts = []
    for k in range(n * (2 if inner else 1)):
        r = radius if inner is None or k % 2 == 0 else radius * inner
        ang = rotation + k * math.pi / (n if inner else n / 2)
        pts.append((cx + r * math.cos(ang), cy + r * math.sin(ang)))
    return pts


def _shape(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    fg, bg = _colours(rng)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in bg))
    draw = ImageDraw.Draw(img)
    radius = size * rng.uniform(0.28, 0.42)
    margin = radius * 0.8
    cx, cy = rng.uniform(margin, size - margin, 2)
    rot = _orientation(rng) - math.pi / 2  # polygons point up
    fill = tuple(int(c) for c in fg)
    if kind == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, radius * 1.1, 4, rot), fill=fill)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, radius * 1.2, 3, rot), fill=fill)
    elif kind == "star":
        draw.polygon(_polygon(cx, cy, radius * 1.2, 5, rot, inner=0.4), fill=fill)
    elif kind == "cross":
        w = radius * 0.35
        arm = [(-radius, -w), (radius, -w), (radius, w), (-radius, w)]
        for turn in (rot, rot + math.pi / 2):
            c, s = math.cos(turn), math.sin(turn)
            draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm], fill=fill)
    return np.asarray(img, dtype=np.float32)


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    fg, bg = _colours(rng)
    period = rng.uniform(size / 8, size / 4)
    theta = _orientation(rng) + {"stripes": 0.0, "checker": 0.0, "dots": 0.0, "waves": math.pi / 2}.get(kind, 0.0)
    phase = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    u = x * math.cos(theta) + y * math.sin(theta)
    v = -x * math.sin(theta) + y * math.cos(theta)
    w = 2 * math.pi / period
    if kind == "stripes":
        mask = np.sin(w * u + phase) > 0
    elif kind == "checker":
        mask = (np.sin(w * u + phase) > 0) ^ (np.sin(w * v + phase) > 0)
    elif kind == "dots":
        mask = np.cos(w * u + phase) * np.cos(w * v + phase) > 0.45
    elif kind == "waves":
        mask = np.sin(w * u + 2.0 * np.sin(w * v / 2) + phase) > 0
    else:  # rings around a random centre
        cx, cy = rng.uniform(0, size, 2)
        mask = np.sin(w * np.hypot(x - cx, y - cy) + phase) > 0
    return np.where(mask[..., None], fg, bg).astype(np.float32)


def make_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    kind = CLASSES[label]
    pixels = _shape(kind, size, rng) if label < 5 else _texture(kind, size, rng)
    pixels += rng.normal(0, 8, pixels.shape)  # sensor-like noise, so that no two images are flat copies
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def generate(root: str | Path, image_size: int = 64, train_per_class: int = 300, val_per_class: int = 60,
             seed: int = 0, quality: int = 90) -> Path:
    """Write ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg; does nothing if ROOT already exists."""
    root = Path(root)
    if root.exists():
        return root
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, per_class, offset in (("train", train_per_class, 0), ("val", val_per_class, 1)):
        for label, name in enumerate(CLASSES):
            folder = tmp / split / name
            folder.mkdir(parents=True)
            rng = np.random.default_rng([seed, offset, label])
            for i in range(per_class):
                make_image(label, image_size, rng).save(folder / f"{name}_{i:05d}.jpg", quality=quality)
    (tmp / "dataset.json").write_text(json.dumps({
        "generator": "dogo.pipelines.shapes", "classes": CLASSES, "image_size": image_size,
        "train_per_class": train_per_class, "val_per_class": val_per_class, "seed": seed}, indent=1))
    tmp.rename(root)
    return root


def main(argv: list[str] | None = None) -> None:
    import argparse
    p = argparse.ArgumentParser(description="Write the procedural demo dataset (skipped if ROOT exists).")
    p.add_argument("root")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--val-per-class", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    existed = Path(a.root).exists()
    generate(a.root, a.image_size, a.train_per_class, a.val_per_class, a.seed)
    print(f"{'kept existing' if existed else 'generated'} dataset at {a.root}")


if __name__ == "__main__":
    main()

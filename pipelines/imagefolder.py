"""One split of an image-folder dataset (torchvision's ImageFolder layout: root/class_name/image.jpg, ImageNet's
train/ and val/): listing it, and `python -m dogo.pipelines.imagefolder ROOT`, the check make runs before a job."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dogo.pipelines.base import DataError
from dogo.pipelines.images import IMAGE_EXTENSIONS

EXPECTED_LAYOUT = """expected the image-folder layout (as torchvision's ImageFolder and ImageNet):
  ROOT/train/<class_name>/<image>.jpg
  ROOT/val/<class_name>/<image>.jpg"""


@dataclass
class ImageFolderIndex:
    root: Path
    classes: list[str]
    paths: list[str]
    labels: np.ndarray  # int64, index into `classes` (sorted class-folder names, as ImageFolder)
    skipped: list[str] = field(default_factory=list)  # entries that could not be listed: "path: reason"

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: list[int]) -> "ImageFolderIndex":
        return ImageFolderIndex(self.root, self.classes, [self.paths[i] for i in keep], self.labels[keep],
                                self.skipped)


def _entries(folder: Path, skipped: list[str]) -> tuple[list[str], list[str]]:
    """(sub-folder names, file names) of `folder`; an entry that cannot be stat'ed (a symlink loop, a dangling
    link, no permission) is skipped and reported rather than stopping the scan."""
    dirs, files = [], []
    for e in os.scandir(folder):
        try:
            if e.is_dir():
                dirs.append(e.name)
            elif e.is_file():
                files.append(e.name)
            elif e.is_symlink():
                skipped.append(f"{folder / e.name}: a symbolic link to nothing")
        except OSError as exc:
            skipped.append(f"{folder / e.name}: {exc.strerror or exc}")
    return sorted(dirs), sorted(files)


def scan(root: str | Path) -> ImageFolderIndex:
    """List the images of one split; clear errors for a missing, empty or malformed folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; {EXPECTED_LAYOUT}")
    skipped: list[str] = []
    classes, _ = _entries(root, skipped)
    if not classes:
        raise DataError(f"{root} has no class folders; {EXPECTED_LAYOUT}")
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        files = [f for f in _entries(root / name, skipped)[1] if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            empty.append(name)
        paths.extend(str(root / name / f) for f in files)
        labels.extend([label] * len(files))
    if not paths:
        raise DataError(f"{root} has class folders but no images with extensions {', '.join(IMAGE_EXTENSIONS)}; "
                        f"{EXPECTED_LAYOUT}")
    if empty:
        warnings.warn(f"{root}: {len(empty)} class folder(s) have no images and contribute no samples "
                      f"(their labels are kept): {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}",
                      stacklevel=2)
    return ImageFolderIndex(root, classes, paths, np.asarray(labels, dtype=np.int64), skipped)


def main(argv: list[str] | None = None) -> int:
    """Check the splits before a long run starts; exit 2 with the reason."""
    import argparse
    p = argparse.ArgumentParser(description="Check an image-folder dataset (ImageNet layout) and count it.")
    p.add_argument("root")
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    a = p.parse_args(argv)
    try:
        for split in a.splits:
            index = scan(Path(a.root) / split)
            print(f"{index.root}: {len(index):,} images in {len(index.classes):,} classes"
                  + (f"; {len(index.skipped)} entries skipped, the first: {index.skipped[0]}" if index.skipped else ""))
    except DataError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

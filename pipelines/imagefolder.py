"""One split of an image-folder dataset (torchvision's ImageFolder layout: root/class_name/image.jpg, ImageNet's
train/ and val/): listing it (`python -m dogo.pipelines.check folder ROOT` counts it before a job)."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dogo.core.errors import DataError
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
    unlisted: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): entries left out by the scan

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def skipped(self) -> list[str]:
        """The entries left out, as "path: reason" lines (how every backend reports skipped files)."""
        return [f"{path}: {reason}" for path, reason in self.unlisted]

    def subset(self, keep: list[int]) -> "ImageFolderIndex":
        return ImageFolderIndex(self.root, self.classes, [self.paths[i] for i in keep], self.labels[keep],
                                self.unlisted)


def _entries(folder: Path, unlisted: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
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
                unlisted.append((str(folder / e.name), "a symbolic link to nothing"))
        except OSError as exc:
            unlisted.append((str(folder / e.name), str(exc.strerror or exc)))
    return sorted(dirs), sorted(files)


def class_folders(root: str | Path) -> list[str]:
    """The sorted class-folder names of a split: its label list (as ImageFolder's)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; {EXPECTED_LAYOUT}")
    return _entries(root, [])[0]


def scan(root: str | Path, classes: list[str] | None = None, labels: str = "folders") -> ImageFolderIndex:
    """List the images of one split; clear errors for a missing, empty or malformed folder. classes: the label list
    to use (the training split's, for an evaluation split), which must hold every class folder here; None: this
    split's own sorted class folders. labels="none" (data.labels): every image at any depth, unlabelled."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; {EXPECTED_LAYOUT}")
    if labels == "none":
        return _scan_unlabelled(root)
    unlisted: list[tuple[str, str]] = []
    folders, loose = _entries(root, unlisted)
    if not folders:
        raise DataError(f"{root} has no class folders; {EXPECTED_LAYOUT}")
    if classes is None:
        classes = folders
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise DataError(f"{root}: class folder(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} are not "
                        f"classes of the training split ({len(classes)} classes); every split's labels come from "
                        f"the training split's class folders: rename or remove them")
    loose = [f for f in loose if f.lower().endswith(IMAGE_EXTENSIONS)]
    if loose:  # an image beside the class folders has no class: said, and reported with the skipped files
        unlisted.extend((str(root / f), "not in a class folder") for f in loose)
        warnings.warn(f"{root}: {len(loose)} image(s) lie beside the class folders, not in one, and are left out: "
                      f"{', '.join(loose[:5])}{' ...' if len(loose) > 5 else ''}", stacklevel=2)
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        if name not in folders:  # a training class without images in this split
            continue
        files = [f for f in _entries(root / name, unlisted)[1] if f.lower().endswith(IMAGE_EXTENSIONS)]
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
    return ImageFolderIndex(root, classes, paths, np.asarray(labels, dtype=np.int64), unlisted)


def _scan_unlabelled(root: Path) -> ImageFolderIndex:
    """Every image under `root` at any depth, label -1 (no classes), in a fixed order: depth first, each folder's
    entries sorted. Symbolic links to folders are not followed (a loop would never end); unreadable entries are
    reported as skipped."""
    unlisted: list[tuple[str, str]] = []
    paths = []

    def walk(folder: Path) -> None:
        dirs, files = _entries(folder, unlisted)
        paths.extend(str(folder / f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
        for d in dirs:
            if (folder / d).is_symlink():
                unlisted.append((str(folder / d), "a symbolic link to a folder (not followed)"))
            else:
                walk(folder / d)
    walk(root)
    if not paths:
        raise DataError(f"{root} (data.labels=none) holds no images with extensions {', '.join(IMAGE_EXTENSIONS)} "
                        f"at any depth")
    return ImageFolderIndex(root, [], paths, np.full(len(paths), -1, dtype=np.int64), unlisted)

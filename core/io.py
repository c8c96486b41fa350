"""Atomic file writes: a half-written file never stands under its final name."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, fsync the result, then rename it onto `path` (and fsync the folder).

    The temporary file lives in the destination folder so that the rename stays on one filesystem (atomic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets what open() would give it
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a write's error does not name its file (a full disk): say which
        tmp.unlink(missing_ok=True)
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj) -> Path:
    """A result file: indented JSON, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


class UnreadableFile(ValueError):
    """A file that is missing or is not what it should be; the message names it."""


def read_torch_file(path: str | Path, what: str):
    """torch.load with weights_only (tensors and plain containers: a crafted pickle cannot run code), with one
    error for a missing file and one for a truncated or foreign one, each naming the file."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise UnreadableFile(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle's own traceback says nothing useful
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:  # torch's paragraph on weights_only, in one line
            raise UnreadableFile(f"{path} is not a readable {what}: it holds a {refused.group(1)}, an object a "
                                 f"weights-only load refuses (it could run code)") from None
        raise UnreadableFile(f"{path} is not a readable {what} ({type(exc).__name__}: {exc})") from None

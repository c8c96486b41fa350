"""Atomic writes: nothing half-written under the final name, and the mode the umask asks for."""
import os
import stat

import pytest

from dogo.core.io import atomic_write, atomic_write_text


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_honours_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "f.yaml", "a: 1\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_failed_write_leaves_nothing(tmp_path):
    (tmp_path / "f.txt").write_text("before")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "f.txt", fail)
    assert (tmp_path / "f.txt").read_text() == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]

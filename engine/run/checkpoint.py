"""Checkpoints as a run writes them: atomically (temporary file, fsync, rename), the newest `keep` kept, the run folder
locked while it trains, and resumable exactly (a resume checks the config it was written by). Reading one:
dogo.core.checkpoint_files."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from dogo.core.errors import CheckpointError
from dogo.core.registry import METHODS
from dogo.core.checkpoint_files import all_checkpoints, folder, latest, state_mismatch
from dogo.core.io import atomic_write


# Keys whose change makes a checkpoint unusable for a run (model shapes, optimiser state, data position).
STRUCTURAL_KEYS = ("objective.name", "objective.share_views", "optim.name", "data.batch_size")
PEER_KEYS = ("arch", "cifar_stem", "head_hidden", "head_out", "head_layers", "ssl")  # and its method's `structural` settings




def save(run_dir: Path, state: dict, step: int, keep: int) -> Path:
    path = folder(run_dir) / f"step_{step:09d}.pt"
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError(enforce fail ...)
        previous = latest(run_dir)
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"could not write checkpoint {path} ({reason}): is the disk full, or a file-size limit set? "
            f"Nothing was left half-written; "
            + (f"the newest checkpoint is still {previous}" if previous else "no earlier checkpoint exists")) from None
    for old in all_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


class RunLock:
    """An exclusive lock on a run folder (flock on RUN/.lock) for the run's lifetime: a second run into the same
    folder is refused instead of overwriting checkpoints and interleaving metrics. The kernel drops the lock when its
    process dies, so a lock file left by a killed run is simply taken over (its pid is named). The file names the
    run's main process: a lock still held after that process died is held by an orphan that inherited it (a
    DataLoader worker of a killed run, for the seconds until it notices), and is taken over too, on a fresh file."""

    def __init__(self, run_dir: Path):
        import fcntl
        import os
        self.path = Path(run_dir) / ".lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = open_run_file(self.path, os.O_RDWR | os.O_CREAT)
        previous = os.pread(self._fd, 64, 0).decode(errors="replace").strip()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            if previous.isdigit() and not _running(int(previous)):
                self._fd = _fresh_lock(self.path)
            else:
                raise CheckpointError(f"run folder {run_dir} is in use by another dogo run (process "
                                      f"{previous or '?'}); wait for it to finish, or give this run another "
                                      f"name=...") from None
        self.taken_over = previous if previous and previous != str(os.getpid()) else None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        """Drop the lock and clear the pid, so the next run does not report taking over from a run that ended
        cleanly (only a killed run leaves its pid behind)."""
        import os
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def open_run_file(path: Path, flags: int) -> int:
    """os.open of a run folder's own file (its lock, metrics.jsonl) that does not follow a symbolic link standing
    at `path`: writing through one (a truncate, an append) would change whatever file it points to. A link is
    refused with a CheckpointError naming it."""
    import errno
    import os
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP or not Path(path).is_symlink():
            raise
        raise CheckpointError(f"{path} is a symbolic link (to {os.readlink(path)}); a run folder's own files are "
                              f"never written through links: remove it, then run again") from None


def _running(pid: int) -> bool:
    import os
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fresh_lock(path: Path) -> int:
    """A new lock file in place of one an orphan holds (its lock stays on the old file, which no one opens again),
    locked: the file descriptor."""
    import fcntl
    import os
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    fd = open_run_file(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.replace(tmp, path)
    return fd


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files (.step_*.tmp) a run killed while writing a checkpoint left behind; they never
    stand under a checkpoint's name, so nothing reads them."""
    d = folder(run_dir)
    stale = sorted(d.glob(".step_*.tmp")) if d.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def set_aside(run_dir: Path, stamp: str) -> Path | None:
    """Move a previous run's checkpoints into checkpoints/previous_STAMP/ before a fresh start in the same folder.

    Left in place they would be taken for this run's: `latest` (resume, eval, export) would pick a higher-step
    checkpoint of the earlier run, and `save` would prune this run's lower-step files in their favour."""
    found = all_checkpoints(run_dir)
    if not found:
        return None
    aside, n = folder(run_dir) / f"previous_{stamp}", 1
    while aside.exists():  # two fresh starts within a second
        aside, n = folder(run_dir) / f"previous_{stamp}_{n}", n + 1
    aside.mkdir()
    for path in found:
        path.rename(aside / path.name)
    return aside


def load_peers(peers: Mapping[str, torch.nn.Module], state: dict, path: Path) -> None:
    """Every peer's weights from a checkpoint, strictly; a CheckpointError naming the file and the tensors that do
    not fit (rather than torch's RuntimeError)."""
    for name, peer in peers.items():
        problem = state_mismatch(peer, state["peers"].get(name, {}))
        if problem:
            raise CheckpointError(f"{path}: peer '{name}' does not fit this run's model ({problem}); use a checkpoint "
                                  f"of this config, or a new run name")
        peer.load_state_dict(state["peers"][name])


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def changed_settings(saved_cfg: dict, cfg: dict) -> list[str]:
    """The keys (dotted) whose values differ between a checkpoint's config and this run's, other than where the
    run resumes from: what a resume applies anew (lr, weight decay, schedule, logging...)."""
    out = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b and prefix != "checkpoint.resume":
            out.append(f"{prefix}: {a!r} -> {b!r}")
    walk(saved_cfg, cfg, "")
    return out


def check_compatible(saved_cfg: dict, cfg: dict, path: Path) -> None:
    """Raise if the checkpoint was made by a config with other models, optimiser or batch position."""
    diffs = []
    for key in STRUCTURAL_KEYS:
        if _get(saved_cfg, key) != _get(cfg, key):
            diffs.append(f"{key}: checkpoint {_get(saved_cfg, key)!r}, config {_get(cfg, key)!r}")
    if list(saved_cfg["peers"]) != list(cfg["peers"]):
        diffs.append(f"peers: checkpoint {list(saved_cfg['peers'])}, config {list(cfg['peers'])}")
    else:
        for name in cfg["peers"]:
            saved, now = saved_cfg["peers"][name], cfg["peers"][name]
            method = METHODS.get(now["ssl"], f"peers.{name}.ssl")
            keys = [*PEER_KEYS, *(f"{method.name}.{k}" for k in method.structural)]
            for key in keys:
                a, b = _get(saved, key), _get(now, key)
                if a != b:
                    diffs.append(f"peers.{name}.{key}: checkpoint {a!r}, config {b!r}")
    if diffs:
        raise CheckpointError(f"{path} was written by another config ({'; '.join(diffs)}); "
                              f"use a new run name, or checkpoint.resume=none to start fresh")

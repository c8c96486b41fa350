"""Checkpoints: written atomically (temporary file, fsync, rename), the newest `keep` kept, resumable exactly."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from dogo.engine.errors import CheckpointError, ConfigError
from dogo.engine.ssl.methods import METHODS
from dogo.engine.io import UnreadableFile, atomic_write, read_torch_file

_NAME = re.compile(r"^step_(\d{9})\.pt$")

# Keys whose change makes a checkpoint unusable for a run (model shapes, optimiser state, data position).
STRUCTURAL_KEYS = ("objective.name", "objective.share_views", "optim.name", "data.batch_size")
PEER_KEYS = ("arch", "cifar_stem", "head_hidden", "head_out", "head_layers", "ssl")  # and its method's `structural` settings




def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


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


def all_checkpoints(run_dir: Path) -> list[Path]:
    d = folder(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def latest(run_dir: Path) -> Path | None:
    found = all_checkpoints(run_dir)
    return found[-1] if found else None


def resolve(spec: str | Path) -> Path:
    """A checkpoint file, or a run folder standing for its newest checkpoint."""
    path = Path(spec)
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"run folder {path} has no checkpoints under {folder(path)}; train it first or "
                                  f"give a checkpoint file")
        return found
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


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        state = read_torch_file(path, "dogo checkpoint")
    except UnreadableFile as exc:
        raise CheckpointError(str(exc)) from None
    missing = [k for k in ("config", "peers", "position") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a dogo checkpoint (it has no {', '.join(missing)}): give a run folder "
                              f"or a file from its checkpoints/ (an exported backbone is a plain state_dict; a DisCo "
                              f"teacher takes it as teacher.backbone)")
    problem = _structure_problem(state)
    if problem:
        raise CheckpointError(f"{path} is a damaged dogo checkpoint ({problem}); use another checkpoint of the run")
    return state


def _structure_problem(state: dict) -> str | None:
    """What in a loaded checkpoint is not of the form the trainer writes, or None."""
    if not isinstance(state["config"], dict):
        return f"its config is a {type(state['config']).__name__}, not a mapping"
    peers = state["peers"]
    if not isinstance(peers, dict) or not peers:
        return "its peers are not a mapping of names to state_dicts"
    for name, tensors in peers.items():
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in tensors.items()):
            return f"peer {name!r} is not a state_dict (a mapping of names to tensors)"
    position = state["position"]
    if not isinstance(position, dict) or sorted(position) != ["epoch", "step", "step_in_epoch"] or \
            not all(isinstance(v, int) and v >= 0 for v in position.values()):
        return "its position is not step, epoch and step_in_epoch"
    return None


def load_run(spec: str | Path, overrides: list[str] = ()):
    """(path, state, config) of a checkpoint (a file, or a run folder's newest) for evaluation, export and plots: the
    file whole and finite, its run's config with `overrides` applied and the machine's settings (device, precision)
    resolved for this machine rather than the one it was trained on, and every peer's tensors of the shapes the
    config's model has. What is wrong with the file is a CheckpointError naming it; an override that would change a
    model's shapes (peers.NAME.head_out=64 at eval) is one naming the tensor."""
    from dogo.engine import config as config_mod
    path = resolve(spec)
    state = load(path)
    check_finite(state, path)
    try:
        config_mod.from_dict(state["config"], this_machine=True)
    except (ConfigError, TypeError, AttributeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: its config cannot be read ({type(exc).__name__}: {exc}); use another "
                              f"checkpoint of the run") from None
    cfg = config_mod.from_dict(state["config"], overrides, this_machine=True)
    problem = peers_mismatch(cfg, state)
    if problem:
        own = peers_mismatch(config_mod.from_dict(state["config"], this_machine=True), state) if overrides else problem
        if own:
            raise CheckpointError(f"{path}: its {own}, as its own config builds it: the file is damaged or was "
                                  f"edited; use another checkpoint of the run")
        raise CheckpointError(f"{path}: the overrides change a peer's shapes ({problem}); settings that shape a model "
                              f"(peers.NAME.arch, head sizes, a ViT's image size) come from the checkpoint: drop "
                              f"those overrides")
    return path, state, cfg


def peers_mismatch(cfg, state: dict) -> str | None:
    """How the checkpoint's peers differ from the model `cfg` builds (built on the meta device: no memory, no
    weights), in words, or None when every peer loads."""
    from dogo.engine.ssl.peers import PeerSet
    if list(state["peers"]) != list(cfg.peers):
        return f"peers are {', '.join(state['peers'])} where the config has {', '.join(cfg.peers)}"
    with torch.device("meta"):
        model = PeerSet(cfg)
    for name, peer in model.peers.items():
        problem = state_mismatch(peer, state["peers"][name])
        if problem:
            return f"peer '{name}' does not fit the model ({problem})"
    return None


def state_mismatch(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps `state` from loading into `module` strictly (missing keys, unexpected keys, wrong shapes; five of
    each at most), or None."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    parts = [f"{len(keys)} {label}: {', '.join(keys[:5])}" + (", ..." if len(keys) > 5 else "")
             for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes))
             if keys]
    return "; ".join(parts) or None


def load_peers(peers: Mapping[str, torch.nn.Module], state: dict, path: Path) -> None:
    """Every peer's weights from a checkpoint, strictly; a CheckpointError naming the file and the tensors that do
    not fit (rather than torch's RuntimeError)."""
    for name, peer in peers.items():
        problem = state_mismatch(peer, state["peers"].get(name, {}))
        if problem:
            raise CheckpointError(f"{path}: peer '{name}' does not fit this run's model ({problem}); use a checkpoint "
                                  f"of this config, or a new run name")
        peer.load_state_dict(state["peers"][name])


# No trained network's weight or BatchNorm statistic comes near this; a diverging one passes it within a few steps
# (at optim.lr=1e36 the weights reached 4.9e34 while every loss was still finite).
ABSURD_WEIGHT = 1e15


def diverged(named: Mapping[str, torch.Tensor], limit: float | None = ABSURD_WEIGHT) -> str | None:
    """The name of the first floating tensor holding NaN or inf (or, with `limit`, a magnitude above it), or None.
    One reduction per tensor, then one read: meant for checkpoint and evaluation time, not the training step."""
    names = [n for n, t in named.items() if t.is_floating_point() and t.numel()]
    if not names:
        return None
    peaks = torch.stack([t.detach().abs().amax().float() for t in (named[n] for n in names)])
    bad = ~torch.isfinite(peaks) if limit is None else ~(peaks <= limit)  # NaN fails every comparison
    found = bad.nonzero()
    return None if not len(found) else f"{names[int(found[0])]} (|x| up to {float(peaks[int(found[0])]):.3g})"


def check_finite(state: dict, path: Path) -> None:
    """Refuse weights with NaN, inf or absurd magnitudes: a run that diverged must not be evaluated, exported or
    distilled from."""
    for peer, tensors in state["peers"].items():
        name = diverged(tensors)
        if name:
            raise CheckpointError(f"{path}: peer '{peer}' holds non-finite or absurdly large values ({name}); its "
                                  f"training diverged. Use an earlier checkpoint")


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

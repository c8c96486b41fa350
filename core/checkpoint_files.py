"""Checkpoint files: where a run keeps them, which is the newest, and reading one (a dogo checkpoint is a dict of
its config, its peers' weights and its position, written by engine/run/checkpoint.py). Used wherever a trained run
is read: resuming, evaluating, exporting, a DisCo teacher."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from dogo.core.errors import CheckpointError
from dogo.core.io import UnreadableFile, read_torch_file

_NAME = re.compile(r"^step_(\d{9})\.pt$")


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


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


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        state = read_torch_file(path, "dogo checkpoint")
    except UnreadableFile as exc:
        raise CheckpointError(str(exc)) from None
    return checked(state, path)


def checked(state, path: Path) -> dict:
    """A file's loaded contents, if they are a whole dogo checkpoint; else a CheckpointError naming the file."""
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
        refuse_diverged(tensors, f"{path}: peer '{peer}'")


def refuse_diverged(named: Mapping[str, torch.Tensor], where: str) -> None:
    """A CheckpointError naming `where` and the first diverged tensor, if any (diverged)."""
    name = diverged(named)
    if name:
        raise CheckpointError(f"{where} holds non-finite or absurdly large values ({name}); its training diverged. "
                              f"Use an earlier checkpoint")

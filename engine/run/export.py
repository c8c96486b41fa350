"""`dogo export`: one peer's backbone (and, if asked, its projection head) as a plain state_dict of its library,
and the lines that load it with that library alone (no dogo needed)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dogo.core.errors import ConfigError
from dogo.core.io import atomic_write
from dogo.core.registry import BACKBONES
from dogo.engine.eval.saved import SavedRun


@dataclass
class Exported:
    backbone: Path
    tensors: int
    library: str
    load_lines: list[str]  # Python that loads it with the library alone
    head: Path | None = None
    head_tensors: int = 0
    notes: list[str] = field(default_factory=list)


def export_peer(run: SavedRun, peer: str, out: str | Path, library: str | None = None,
                head_out: str | Path | None = None) -> Exported:
    """Write peer `peer`'s backbone to `out` as `library`'s state_dict (default: the backbone's own library; a
    torchvision ResNet without the CIFAR stem also loads into timm's ResNet of the same name)."""
    cfg = run.cfg.peers[peer]
    backbone = BACKBONES.get(cfg.arch, f"peers.{peer}.arch")
    library = library or backbone.library
    if backbone.library == "dogo" and library != "dogo":
        raise ConfigError(f"--format {library}: {cfg.arch} exists only in dogo (no library ships it); export it "
                          f"without --format, and load it with the lines printed")
    if library == "timm" and backbone.library != "timm" and (backbone.timm_name is None or cfg.cifar_stem):
        raise ConfigError(f"--format timm: the {cfg.arch} backbone of peer '{peer}' has no timm model with its "
                          f"keys" + (" (its CIFAR stem is not timm's)" if cfg.cifar_stem else "")
                          + "; export it as --format torchvision")
    if library == "torchvision" and backbone.library == "timm":
        raise ConfigError(f"--format torchvision: peer '{peer}' is a timm model ({cfg.arch}); use --format timm")
    state = run.state["peers"][peer]
    weights = _under(state, "backbone.")
    atomic_write(out, lambda tmp: torch.save(weights, tmp))
    result = Exported(Path(out), len(weights), library,
                      backbone.load_lines(str(out), run.cfg.data.image_size, cfg.arch_args, library, cfg.cifar_stem))
    if head_out:
        head = _under(state, "head.")
        atomic_write(head_out, lambda tmp: torch.save(head, tmp))
        result.head, result.head_tensors = Path(head_out), len(head)
    return result


def _under(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

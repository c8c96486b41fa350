"""A trained run opened for use (`dogo eval`, `export`, `plot features`, the study): its checkpoint, its config
resolved for this machine with the command's overrides, and its peers built with the trained weights. The one way a
command loads a run's peer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dogo.core.errors import CheckpointError, ConfigError
from dogo.engine import config as config_mod
from dogo.engine.config import Config
from dogo.core import checkpoint_files
from dogo.engine.ssl.peers import PeerSet, build_peers


@dataclass
class SavedRun:
    path: Path  # the checkpoint file
    state: dict  # what checkpoint_files.load read
    cfg: Config  # its config, resolved for this machine, with the command's overrides

    @classmethod
    def open(cls, spec: str | Path, overrides: list[str] = ()) -> "SavedRun":
        """A checkpoint file, or a run folder's newest: the file whole and finite, its config readable on this
        machine, with `overrides` applied, and every peer's tensors of the shapes that config's model has. What is
        wrong with the file is a CheckpointError naming it; an override that would change a model's shapes
        (peers.NAME.head_out=64 at eval) is one naming the tensor."""
        path = checkpoint_files.resolve(spec)
        state = checkpoint_files.load(path)
        checkpoint_files.check_finite(state, path)
        try:
            own = config_mod.from_dict(state["config"])
        except (ConfigError, TypeError, AttributeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: its config cannot be read ({type(exc).__name__}: {exc}); use another "
                                  f"checkpoint of the run") from None
        problem = _peers_mismatch(own, state)
        if problem:
            raise CheckpointError(f"{path}: its {problem}, as its own config builds it: the file is damaged or was "
                                  f"edited; use another checkpoint of the run")
        cfg = config_mod.from_dict(state["config"], overrides) if overrides else own
        problem = _peers_mismatch(cfg, state)
        if problem:
            raise CheckpointError(f"{path}: the overrides change a peer's shapes ({problem}); settings that shape a "
                                  f"model (peers.NAME.arch, head sizes, a ViT's image size) come from the checkpoint: "
                                  f"drop those overrides")
        return cls(path, state, cfg)

    @property
    def step(self) -> int:
        return self.state["position"]["step"]

    @property
    def peer_names(self) -> list[str]:
        return list(self.state["peers"])

    def peer_name(self, name: str | None) -> str:
        """`name` checked against the run's peers; None means the run's only peer."""
        if name is None:
            if len(self.peer_names) == 1:
                return self.peer_names[0]
            raise ConfigError(f"{self.path} has peers {', '.join(self.peer_names)}: name one with --peer")
        if name not in self.state["peers"]:
            raise ConfigError(f"--peer {name!r}: {self.path} has peers {', '.join(self.peer_names)}")
        return name

    def peers(self, device: torch.device, trained: bool = True, only: str | None = None) -> PeerSet:
        """The run's peers on `device`: with the trained weights (of every peer, or of `only`), or at their random
        initialisation (the run's own seed)."""
        model = build_peers(self.cfg).to(device)
        if trained:  # open() checked every key and shape
            for name in ([only] if only else self.peer_names):
                model.peers[name].load_state_dict(self.state["peers"][name])
        return model

    def result_path(self, name: str) -> Path:
        """RUN/NAME when the checkpoint lies in a run folder's checkpoints/ (its config.yaml beside them); otherwise
        beside the checkpoint file itself, as CKPT_STEM.NAME: never in some folder that merely holds the file's
        folder."""
        run = self.path.parent.parent
        if self.path.parent.name == "checkpoints" and (run / "config.yaml").is_file():
            return run / name
        return self.path.with_name(f"{self.path.stem}.{name}")


def _peers_mismatch(cfg: Config, state: dict) -> str | None:
    """How the checkpoint's peers differ from the model `cfg` builds (on the meta device: no memory, no weights),
    in words, or None when every peer loads."""
    if list(state["peers"]) != list(cfg.peers):
        return f"peers are {', '.join(state['peers'])} where the config has {', '.join(cfg.peers)}"
    with torch.device("meta"):
        model = PeerSet(cfg)
    for name, peer in model.peers.items():
        problem = checkpoint_files.state_mismatch(peer, state["peers"][name])
        if problem:
            return f"peer '{name}' does not fit the model ({problem})"
    return None

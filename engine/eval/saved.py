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
        """A checkpoint file, or a run folder's newest; diverged weights are refused."""
        path = checkpoint_files.resolve(spec)
        state = checkpoint_files.load(path)
        checkpoint_files.check_finite(state, path)
        return cls(path, state, config_mod.from_dict(state["config"], overrides))

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
        if trained:
            for name in ([only] if only else self.peer_names):
                self._load_peer(model, name)
        return model

    def _load_peer(self, model: PeerSet, name: str) -> None:
        try:
            model.peers[name].load_state_dict(self.state["peers"][name])
        except RuntimeError as exc:  # missing or unexpected keys, or shapes the config does not give
            first = " ".join(str(exc).split())[:300]
            raise CheckpointError(f"{self.path}: peer '{name}' does not fit the network its config describes "
                                  f"({first}); evaluate it with its own config (no structural overrides such as "
                                  f"peers.{name}.head_out)") from None

    def result_path(self, name: str) -> Path:
        """RUN/NAME when the checkpoint lies in a run folder's checkpoints/ (its config.yaml beside them); otherwise
        beside the checkpoint file itself, as CKPT_STEM.NAME: never in some folder that merely holds the file's
        folder."""
        run = self.path.parent.parent
        if self.path.parent.name == "checkpoints" and (run / "config.yaml").is_file():
            return run / name
        return self.path.with_name(f"{self.path.stem}.{name}")

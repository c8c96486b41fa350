"""What stops a run before it writes something wrong: a NaN or inf loss (watched on the device, read only at log and
checkpoint steps) and diverged weights or optimiser state (checked before each checkpoint)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from dogo.engine.dist import distributed
from dogo.core.errors import ConfigError
from dogo.core import checkpoint_files


class DivergenceWatch:
    def __init__(self, lr: float, start_step: int = 0):
        self.lr = lr  # optim.lr, named in the advice
        self.nonfinite: torch.Tensor | None = None  # any step's loss NaN or inf since the start, on the device
        self.finite_until = start_step  # the last step verified finite

    def note(self, loss: torch.Tensor) -> None:
        """A step's loss: a flag kept on the device, no host sync. Updated in place after the first step, so that a
        step captured in a CUDA graph keeps or-ing into the same flag."""
        bad = ~torch.isfinite(loss)
        if self.nonfinite is None:
            self.nonfinite = bad
        else:
            self.nonfinite |= bad

    def require_finite(self, step: int, record: dict | None = None) -> None:
        """Stop the run if any step's loss was NaN or inf since the last check (one read of the device flag, agreed
        over the ranks), naming the steps and the terms; the newest checkpoint stays the last finite one."""
        if self.nonfinite is None:
            return
        if distributed.all_reduce_mean(self.nonfinite.float()).item() == 0:  # read at log/checkpoint steps only
            self.finite_until = step
            return
        terms = ", ".join(k for k, v in (record or {}).items() if isinstance(v, float) and not math.isfinite(v))
        raise ConfigError(
            f"the loss became NaN or inf between steps {self.finite_until + 1} and {step}"
            + (f" (non-finite: {terms})" if terms else "") + "; the run stopped without saving, so the newest "
            f"checkpoint is from step {self.finite_until} or before. Lower optim.lr (now {self.lr}) "
            f"or set optim.clip_grad_norm, then resume or start afresh")

    def require_sane_weights(self, peers: torch.nn.Module, optimizer, step: int, run_dir: Path) -> None:
        problem = checkpoint_files.diverged(dict(peers.state_dict()))
        if problem is None:
            state = optimizer.state_dict()["state"]
            problem = checkpoint_files.diverged({f"optimizer state {k}.{name}": t for k, s in state.items()
                                           for name, t in s.items() if isinstance(t, torch.Tensor)}, limit=None)
        if problem:
            newest = checkpoint_files.latest(run_dir)
            raise ConfigError(
                f"the weights diverged by step {step}: {problem}; no checkpoint was written for it, so the "
                f"newest stays {newest or 'none (no earlier checkpoint)'}. Lower optim.lr (now {self.lr}) "
                f"or set optim.clip_grad_norm, then resume or start afresh")

"""SIGTERM, SIGINT and SIGHUP as a request to stop at the next step, agreed by every rank."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from dogo.engine.dist.distributed import DistContext


class StopRequest:
    """SIGTERM/SIGINT/SIGHUP set a flag; all ranks agree on it without stalling the device. SIGHUP is a dropped
    ssh session: the run saves and stops as for SIGTERM instead of dying with its steps since the last checkpoint.

    Ranks may receive a signal one step apart, so the flag is max-reduced over a gloo group on the host, started
    asynchronously at one step and read at the next: the agreement costs no device synchronisation.
    """

    def __init__(self, ctx: DistContext):
        self.local = False
        self._group = dist.new_group(backend="gloo") if ctx.distributed else None
        self._flag = torch.zeros(1)
        self._work = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.local = True

    def should_stop(self) -> bool:
        """Call once per step, identically on every rank."""
        if self._group is None:
            return self.local
        agreed = False
        if self._work is not None:
            self._work.wait()
            agreed = bool(self._flag.item())
        self._flag = torch.tensor([float(self.local)])
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed

    def close(self) -> None:
        if self._work is not None:
            self._work.wait()
        for sig, old in self._old.items():
            signal.signal(sig, old)

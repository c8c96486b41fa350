"""SIGTERM, SIGINT and SIGHUP as a request to stop at the next step, agreed by every rank."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from dogo.engine.dist.distributed import DistContext


class StopRequest:
    """SIGTERM/SIGINT/SIGHUP set a flag; all ranks agree on it without stalling the device. SIGHUP is a dropped
    ssh session: the run saves and stops as for SIGTERM instead of dying with its steps since the last checkpoint.

    Ranks may receive a signal one step apart, so the signal's number is max-reduced over a gloo group on the host,
    started asynchronously at one step and read at the next: the agreement costs no device synchronisation, and
    every rank ends with the same exit status, 128 + the number (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP:
    the shell's convention for a process ended by that signal), which tells a script an interrupted run from a
    finished one.
    """

    def __init__(self, ctx: DistContext):
        self.local = 0  # the number of the first signal this process received; 0: none
        self.agreed = 0  # the signal the run stops for, once should_stop() said so
        self._group = dist.new_group(backend="gloo") if ctx.distributed else None
        self._flag = torch.zeros(1)
        self._work = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.local = self.local or signum

    def should_stop(self) -> bool:
        """Call once per step, identically on every rank."""
        if self._group is None:
            self.agreed = self.local
            return bool(self.agreed)
        if self._work is not None:
            self._work.wait()
            self.agreed = int(self._flag.item())
        self._flag = torch.tensor([float(self.local)])
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return bool(self.agreed)

    @property
    def exit_code(self) -> int:
        """128 + the agreed signal's number; 0 before any."""
        return 128 + self.agreed if self.agreed else 0

    @property
    def name(self) -> str:
        return signal.Signals(self.agreed).name if self.agreed else ""

    def close(self) -> None:
        if self._work is not None:
            self._work.wait()
        for sig, old in self._old.items():
            signal.signal(sig, old)

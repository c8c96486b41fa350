"""What a run says about where it is, from the host's clock alone: the epoch and speed of the progress bar, the
heartbeat line a run without a terminal prints while it works, and the start banner and end summary's text.

Nothing here reads the device: the step and epoch are the host's counters, speeds come from the host's clock
between steps, and the only loss quoted is the one the last metric line already read (log.every).
"""
from __future__ import annotations

import math
import shlex
import threading
import time
from collections import deque
from typing import Callable


def epochs_in(total_steps: int, steps_per_epoch: int) -> int:
    """Epochs the run's steps span (the last one may be cut short by schedule.max_steps)."""
    return math.ceil(total_steps / steps_per_epoch) if steps_per_epoch > 0 else 0


def epoch_label(epoch: int, steps_per_epoch: int, total_steps: int) -> str:
    """"3/4" for the third of four epochs: `epoch` is the 0-based index of the epoch a step belongs to."""
    total = epochs_in(total_steps, steps_per_epoch)
    return f"{epoch + 1}/{total}" if total else str(epoch + 1)


def plural(count: int, noun: str) -> str:
    """"1 epoch", "1,000 epochs"."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def duration(seconds: float) -> str:
    """"45 s", "3 min 12 s", "2 h 05 min": a time a person reads at a glance."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Pace:
    """The host's view of the run's progress: each finished step's number, epoch and time, kept for the last
    `window` steps. Steps per second come from the host's clock over that window (on a GPU the host may run ahead
    of the device by a few steps; over a window that spans a metric line's synchronisation the rate is the
    device's). Noting a step is a clock read and a deque append: nothing in the hot loop waits."""

    def __init__(self, start_step: int, start_epoch: int, images_per_step: int, total_steps: int,
                 steps_per_epoch: int, clock: Callable[[], float] = time.monotonic, window: int = 64):
        self.images_per_step, self.total_steps, self.steps_per_epoch = images_per_step, total_steps, steps_per_epoch
        self.clock = clock
        # (time, step, epoch); the first entry is the moment the run opened, before its first step
        self._notes: deque = deque([(clock(), start_step, start_epoch)], maxlen=window + 1)

    def note(self, step: int, epoch: int) -> None:
        """Step `step` (a count: 1 after the first) finished; `epoch` is the 0-based epoch it belonged to."""
        self._notes.append((self.clock(), step, epoch))

    @property
    def step(self) -> int:
        return self._notes[-1][1]

    @property
    def epoch(self) -> str:
        return epoch_label(self._notes[-1][2], self.steps_per_epoch, self.total_steps)

    def steps_per_s(self) -> float | None:
        """Over the window; None before the first step."""
        (t0, s0, _), (t1, s1, _) = self._notes[0], self._notes[-1]  # indexing: safe while another thread appends
        if s1 == s0 or t1 <= t0:
            return None
        return (s1 - s0) / (t1 - t0)

    def images_per_s(self) -> float | None:
        rate = self.steps_per_s()
        return None if rate is None else rate * self.images_per_step

    def eta_s(self) -> float | None:
        rate = self.steps_per_s()
        return None if rate is None else (self.total_steps - self.step) / rate

    def idle_s(self) -> float:
        """Seconds since the last step finished (or since the run opened)."""
        return self.clock() - self._notes[-1][0]


def heartbeat_line(pace: Pace, last_loss: tuple[int, float] | None, activity: str | None) -> str:
    """One line of what the host knows: step, epoch, images/s, ETA, the last loss a metric line read, and what the
    run is doing when no step has finished for a while."""
    speed, eta = pace.images_per_s(), pace.eta_s()
    parts = [f"step {pace.step}/{pace.total_steps} epoch {pace.epoch}",
             f"{speed:.1f} img/s" if speed is not None else "- img/s",
             f"ETA {duration(eta)}" if eta is not None else "ETA -"]
    if last_loss is not None:
        parts.append(f"loss {last_loss[1]:.4f} at step {last_loss[0]}")
    idle = duration(pace.idle_s())
    if activity:
        parts.append(f"({activity}, {idle} since the last step)")
    elif speed is None:
        parts.append(f"(waiting for the first step for {idle})")
    elif pace.idle_s() >= 5:
        parts.append(f"(no step finished in the last {idle})")
    return "  ".join(parts)


class Heartbeat:
    """A thread that calls `beat()` whenever `seconds` have passed since the last line the run printed (`printed()`
    moves that mark): a run without a terminal (a job log, nohup, CI) says where it is at least every `seconds`,
    also while a step, the first batch or an evaluation takes longer than that. Daemonic; stop() ends it."""

    def __init__(self, seconds: float, beat: Callable[[], None], clock: Callable[[], float] = time.monotonic):
        self.seconds, self._beat, self.clock = seconds, beat, clock
        self._last = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dogo-heartbeat", daemon=True)
        self._thread.start()

    def printed(self) -> None:
        self._last = self.clock()

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self._last + self.seconds - self.clock()
            if wait > 0:
                self._stop.wait(wait)
                continue
            self._beat()
            self.printed()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def banner(run_dir, resumed_from, start_step: int, total_steps: int, steps_per_epoch: int, images: int,
           classes: int | None, where: str, batch: int, world_size: int, device: str, peers: dict[str, str],
           objective: str) -> str:
    """The start banner: where the run writes, fresh or resumed, what it reads and how long it is."""
    start = (f"resumed at step {start_step} of {total_steps} from {resumed_from}" if resumed_from
             else f"a fresh start, {total_steps} steps")
    labels = f"{classes} classes" if classes else "no labels"
    return "\n".join([
        f"run folder {run_dir}: {start}",
        f"data: {images:,} images, {labels} ({where})",
        f"schedule: {plural(steps_per_epoch, 'step')} per epoch of {batch} images, {plural(total_steps, 'step')} "
        f"({plural(epochs_in(total_steps, steps_per_epoch), 'epoch')}); device {device}, {world_size} "
        + ("rank" if world_size == 1 else "ranks"),
        f"{objective}: " + ", ".join(f"{name} {what}" for name, what in peers.items()),
    ])


def next_commands(run_dir, peers: list[str]) -> list[str]:
    """What to run on a finished run: its kNN table, a linear probe and an export of its first peer."""
    run = shlex.quote(str(run_dir))
    peer = peers[0]
    choose = f" --peer {shlex.quote(peer)}" if len(peers) > 1 else ""
    return [f"dogo eval knn {run}", f"dogo eval linear {run}{choose}",
            f"dogo export {run} {shlex.quote(peer + '.pt')}{choose}"]


def summary(step: int, total_seconds: float | None, session_seconds: float, start_step: int,
            last_loss: tuple[int, float] | None, knn_top1: dict[str, float], knn_step: int | None,
            checkpoint, skipped: int, run_dir, peers: list[str]) -> str:
    """The end summary: steps, the whole run's time (all its sessions, when its checkpoints recorded them), the last
    loss and kNN, the checkpoint, and the commands to run next."""
    if start_step == 0:
        took = duration(session_seconds)
    elif total_seconds is not None:
        took = f"{duration(total_seconds)} ({duration(session_seconds)} since resuming at step {start_step})"
    else:  # a checkpoint written before they recorded time
        took = f"{duration(session_seconds)} since resuming at step {start_step} (earlier sessions not recorded)"
    lines = [f"finished {step} steps in {took}"
             + (f"; {skipped} undecodable file(s) were skipped" if skipped else "")]
    results = []
    if last_loss is not None:
        results.append(f"last loss {last_loss[1]:.4f} (step {last_loss[0]})")
    if knn_top1:
        results.append(f"kNN top-1 at step {knn_step}: " + ", ".join(f"{n} {v:.2f}%" for n, v in knn_top1.items()))
    if results:
        lines.append("; ".join(results))
    if checkpoint is not None:
        lines.append(f"checkpoint: {checkpoint}")
    commands = next_commands(run_dir, peers)
    lines += [f"next: {commands[0]}", *(f"      {c}" for c in commands[1:])]
    return "\n".join(lines)

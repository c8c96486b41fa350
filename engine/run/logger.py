"""JSON-lines metrics in the run folder, TensorBoard event files beside them, and a rich progress bar; loss terms
stay on the device between log steps."""
from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dogo.engine.dist.distributed import all_reduce_mean
from dogo.core.errors import ConfigError, DataError
from dogo.core.io import atomic_write_text
from dogo.engine.run.checkpoint import open_run_file
from dogo.engine.run.progress import Heartbeat, Pace, heartbeat_line


class TensorBoardLog:
    """Event files in RUN/tb: every logged scalar with the optimiser step as x. A resumed run purges what a stopped
    run wrote after its checkpoint's step, so its curves continue without a fold.

    TensorBoard writes from a thread of its own and raises a failed write (a full disk) at the next call here: that
    error is raised naming the events file, and the thread's own traceback is not printed."""

    def __init__(self, run_dir: Path, start_step: int, config_text: str):
        from torch.utils.tensorboard import SummaryWriter
        # the first step this run logs is start_step + 1: readers drop anything a stopped run wrote from there on
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"),
                                    purge_step=start_step + 1 if start_step else None)
        event_writer = self.writer._get_file_writer().event_writer
        self.path = getattr(event_writer, "_file_name", str(Path(run_dir) / "tb"))
        self.failed = False
        _quiet_thread(getattr(getattr(event_writer, "_async_writer", None), "_worker", None))
        self._named(lambda: self.writer.add_text("config", "```yaml\n" + config_text + "\n```", start_step + 1))

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        def write():
            for key, value in values.items():
                self.writer.add_scalar(prefix + key, value, step)
            self.writer.flush()  # at log steps only: a crash loses nothing already printed
        self._named(write)

    def close(self) -> None:
        if self.failed:  # its error was raised already; closing would raise it again
            return
        self._named(self.writer.close)

    def _named(self, write) -> None:
        """write(), with an OSError raised naming the events file (TensorBoard's does not)."""
        try:
            write()
        except OSError as exc:
            self.failed = True
            raise OSError(exc.errno, exc.strerror or str(exc), self.path) from None


_QUIET_THREADS: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()


def _quiet_thread(thread: threading.Thread | None) -> None:
    """No traceback printed for an OSError that ends `thread` (TensorBoard's writer thread keeps it and raises it in
    the thread that writes next, where it becomes one line); every other thread's exceptions print as before."""
    if thread is None:
        return
    _QUIET_THREADS.add(thread)
    if getattr(threading.excepthook, "quiet_writer_threads", False):
        return
    previous = threading.excepthook

    def hook(args) -> None:
        if args.thread in _QUIET_THREADS and isinstance(args.exc_value, OSError):
            return
        previous(args)
    hook.quiet_writer_threads = True
    threading.excepthook = hook


class WandbLog:
    """A Weights & Biases run (log.wandb: online or offline; offline writes RUN/wandb/offline-run-*, uploaded later
    with `wandb sync`): the same scalars as TensorBoard at the same steps, and the resolved config. The run's W&B id
    is kept in RUN/wandb_run_id, so a resumed run continues the same W&B run; a fresh start makes a new one. W&B keeps
    a step's first value: what a stopped run logged after its checkpoint's step stays, where TensorBoard purges it."""

    ID_FILE = "wandb_run_id"

    def __init__(self, run_dir: Path, start_step: int, config: dict, mode: str, project: str, entity: str,
                 name: str):
        import wandb
        id_file = Path(run_dir) / self.ID_FILE
        fresh = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
        run_id = id_file.read_text().strip() if start_step and id_file.is_file() else fresh
        if mode == "online":
            _require_reachable(os.environ.get("WANDB_BASE_URL") or wandb.setup().settings.base_url)
        atomic_write_text(id_file, run_id + "\n")
        try:
            self.run = wandb.init(mode=mode, dir=str(run_dir), id=run_id, resume="allow", project=project,
                                  entity=entity or None, name=name, config=config,
                                  settings=wandb.Settings(silent=True, console="off"))
        except wandb.errors.Error as exc:  # no API key, a key of the wrong form, a server that does not answer
            reason = " ".join(str(exc).split())[:300]
            raise ConfigError(f"log.wandb={mode}: W&B could not start a run ({type(exc).__name__}: {reason}); log in "
                              f"with `wandb login` (or set WANDB_API_KEY), or set log.wandb=offline and upload "
                              f"later with `wandb sync`") from None

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        self.run.log({prefix + k: v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def _require_reachable(url: str, timeout: float = 3.0) -> None:
    """A ConfigError within `timeout` seconds when nothing accepts a connection at the W&B server `url`'s host and
    port (or at the proxy the environment names for it): W&B's client would otherwise retry for 90 s, then fail
    with a traceback."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit
    target = urlsplit(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    via = urlsplit(proxy) if proxy and not urllib.request.proxy_bypass(target.hostname or "") else target
    port = via.port or (443 if via.scheme == "https" else 80)
    try:
        socket.create_connection((via.hostname, port), timeout=timeout).close()
    except OSError as exc:
        through = f" through the proxy {proxy}" if via is not target else ""
        raise ConfigError(f"log.wandb=online: the W&B server at {url} cannot be reached{through} "
                          f"({exc.strerror or type(exc).__name__}); check the network (or WANDB_BASE_URL), or set "
                          f"log.wandb=offline and upload later with `wandb sync`") from None


def open_sinks(run_dir: Path, is_main: bool, start_step: int, log_cfg, config: dict, config_text: str) -> list:
    """The scalar sinks the main rank writes besides metrics.jsonl: TensorBoard and W&B, as log.* asks."""
    if not is_main:
        return []
    sinks: list = []
    try:
        if log_cfg.tensorboard == "on":
            sinks.append(TensorBoardLog(run_dir, start_step, config_text))
        if log_cfg.wandb != "off":
            sinks.append(WandbLog(run_dir, start_step, config, log_cfg.wandb, log_cfg.wandb_project,
                                  log_cfg.wandb_entity, config.get("name", Path(run_dir).name)))
    except BaseException:  # W&B refused to start: what was opened before it is closed, not left writing
        for sink in sinks:
            sink.close()
        raise
    return sinks


def _finite_or_null(value, key: str, bad: list[str]):
    """`value` with every float that is not finite replaced by None, inside mappings too; their keys go into `bad`."""
    if isinstance(value, dict):
        return {k: _finite_or_null(v, f"{key}.{k}" if key else str(k), bad) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        bad.append(key)
        return None
    return value


class MetricsLogger:
    """metrics.jsonl, the scalar sinks and what the main rank prints: metric lines every log.every steps (the only
    device reads), events, and where the run is: the progress bar on a terminal, else a heartbeat line whenever
    `heartbeat_s` seconds passed without a line (engine/run/progress.py; host clock only)."""

    def __init__(self, run_dir: Path, is_main: bool, total_steps: int, start_step: int, images_per_step: int,
                 world_size: int, progress: bool = False, sinks: list | None = None, *, steps_per_epoch: int = 0,
                 start_epoch: int = 0, heartbeat_s: float = 0.0, clock=time.monotonic):
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.sinks = sinks or []  # TensorBoardLog, WandbLog: scalars(values, step, prefix), close()
        self.images_per_step, self.world_size = images_per_step, world_size
        # a line as wide as its content: in a job log or a pipe rich would otherwise wrap at 80 columns
        self.console = Console(file=sys.stdout, soft_wrap=True)
        self.pace = Pace(start_step, start_epoch, images_per_step, total_steps, steps_per_epoch, clock)
        self.last_loss: tuple[int, float] | None = None  # (step, loss) of the last metric line
        self.activity: str | None = None  # what the run does between steps (an evaluation), for the heartbeat
        self.progress = None
        self.heartbeat = None
        if is_main and progress:  # log.progress, resolved by the config (on when stdout is a terminal)
            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[speed]} img/s"), TextColumn("{task.fields[terms]}"),
                TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                               epoch=self.pace.epoch, speed="-", terms="")
            self.progress.start()
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0
        self._t0 = time.perf_counter()
        dropped = drop_partial_line(self.path) if is_main else 0
        if dropped:
            self.event("metrics_repaired", f"{self.path} ended in a partial line ({dropped} bytes: a run stopped while "
                       f"writing it, e.g. by a full disk); dropped it before appending", dropped_bytes=dropped)
        # no bar drawn live (log.progress=off, or on where stdout is no terminal): the heartbeat; started last, so
        # that nothing after it can fail and leave it beating
        if is_main and heartbeat_s > 0 and not (self.progress and self.console.is_terminal):
            self.heartbeat = Heartbeat(heartbeat_s, self.beat, clock)

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """Accumulate one step's terms on the device: no host synchronisation."""
        for k, v in terms.items():
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
        self._steps += 1

    def step_done(self, step: int, epoch: int) -> None:
        """Step `step` finished, in the 0-based `epoch`: the bar's epoch and images/s from the host's clock, the
        heartbeat's facts. Reads nothing from the device."""
        self.pace.note(step, epoch)
        if self.progress is not None:
            speed = self.pace.images_per_s()
            self.progress.update(self.task, completed=step, epoch=self.pace.epoch,
                                 speed="-" if speed is None else f"{speed:.1f}")

    def beat(self) -> None:
        """The heartbeat's line (from its thread)."""
        self.console.print(heartbeat_line(self.pace, self.last_loss, self.activity), highlight=False, markup=False)

    def say(self, text: str) -> None:
        """Print a line (or several) on the main rank; the heartbeat waits its full period after it."""
        if self.is_main:
            self.console.print(text, highlight=False, markup=False)
            if self.heartbeat is not None:
                self.heartbeat.printed()

    def flush(self, step: int, epoch: int, lrs: dict[str, float]) -> dict:
        """Average the accumulated terms over steps and ranks (one sync), write a line, reset."""
        if not self._steps:
            return {}
        keys = sorted(self._sums)
        values = all_reduce_mean(torch.stack([self._sums[k] for k in keys]) / self._steps).tolist()
        elapsed = time.perf_counter() - self._t0
        speed = self._steps * self.images_per_step / max(elapsed, 1e-9)
        record = {"step": step, "epoch": epoch, "images_per_s": round(speed, 2),
                  "images_per_s_per_rank": round(speed / self.world_size, 2),
                  **{k: round(v, 6) for k, v in zip(keys, values)},
                  **{f"lr/{k}": v for k, v in lrs.items()}}
        self._sums, self._steps, self._t0 = {}, 0, time.perf_counter()
        if self.is_main:
            self._write(record)
            for sink in self.sinks:
                sink.scalars({k: v for k, v in record.items() if k not in ("step", "epoch")}, step)
            terms = "  ".join([f"{k} {record[k]:.4f}" for k in keys] + [f"lr/{k} {v:.3g}" for k, v in lrs.items()])
            if "loss" in record:
                self.last_loss = (step, record["loss"])
            if self.progress is not None:
                self.progress.update(self.task, terms=terms)
            else:
                self.say(f"step {step}/{self.pace.total_steps} epoch {self.pace.epoch}  {speed:.1f} img/s  {terms}")
        return record

    def event(self, kind: str, message: str | None, **fields) -> None:
        """A one-off record (evaluation, checkpoint, warning), written and printed (unless `message` is None) by the
        main rank."""
        if self.is_main:
            self._write({"event": kind, **fields})
            if message is not None:
                self.say(message)

    def knn(self, step: int, epoch: int, top1: dict[str, float], train_seconds: float | None = None) -> None:
        """The kNN monitor's top-1 of every peer: an event line (with the training time so far, evaluation
        excluded), and a curve per peer in TensorBoard."""
        self.event("knn", "kNN top-1: " + ", ".join(f"{n} {v:.2f}%" for n, v in top1.items()), step=step,
                   epoch=epoch, top1=top1, train_seconds=train_seconds)
        for sink in self.sinks:
            sink.scalars(top1, step, prefix="knn_top1/")

    def online_probe(self, step: int, epoch: int, top1: dict[str, float]) -> None:
        """The online probe's val top-1 of every peer: an event line and a curve per peer in TensorBoard."""
        self.event("online_probe", "online probe val top-1: " + ", ".join(f"{n} {v:.2f}%" for n, v in top1.items()),
                   step=step, epoch=epoch, top1=top1)
        for sink in self.sinks:
            sink.scalars(top1, step, prefix="online_probe_top1/")

    def _write(self, record: dict) -> None:
        # NaN and inf are not JSON: written as null, and named (a.b for a peer's value in a mapping such as the kNN
        # event's top1), so that every line stays readable
        bad: list[str] = []
        record = _finite_or_null(record, "", bad)
        if bad:
            record = {**record, "nonfinite": bad}
        try:
            with os.fdopen(open_run_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        except OSError as exc:  # a write's error does not name its file: this one does (a full disk, a quota)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def close(self) -> None:
        """Stop the progress bar or the heartbeat and close every sink, each even when one before it fails (the
        first error is raised after)."""
        if self.progress is not None:
            self.progress.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 (raised below, once every sink had its turn)
                errors.append(exc)
        if errors:
            raise errors[0]


def drop_partial_line(path: Path) -> int:
    """Repair a JSON-lines file whose last line was cut short (a run stopped mid-write: a full disk, a kill), so that
    what is appended next starts a line of its own: the partial line is dropped (a last line that is whole JSON and
    lacks only its newline gets the newline). Returns the bytes dropped; 0 when there was nothing to repair."""
    if not path.exists() and not path.is_symlink():
        return 0
    fd = open_run_file(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return 0
        start = size
        while start > 0:  # back to the last newline, 64 kB at a time
            chunk = os.pread(fd, min(65536, start), max(0, start - 65536))
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                start = start - len(chunk) + cut + 1
                break
            start -= len(chunk)
        tail = os.pread(fd, size - start, start)
        try:
            whole = isinstance(json.loads(tail), dict)
        except ValueError:
            whole = False
        if whole:
            os.pwrite(fd, b"\n", size)
            return 0
        os.ftruncate(fd, start)
        return size - start
    finally:
        os.close(fd)


def read_metrics(spec: str | Path) -> tuple[str, list[dict], list[dict]]:
    """(name, step records, kNN events) of a run folder or a metrics.jsonl file. A run started afresh in the same
    folder appends to its file: only the records after the last start (step falling back) are kept. A resumed run
    (its "resume" event at step S, e.g. after a kill) continues the history: only the records after S, which the
    resume replays, are dropped."""
    path = Path(spec)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{spec}: no metrics.jsonl there; give a run folder (out_dir/name) or its metrics.jsonl")
    name = path.parent.name if path.name == "metrics.jsonl" else path.stem
    steps, knn = [], []
    text = path.read_text()
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) and not text.endswith("\n"):  # cut short by a run stopped mid-write (a full disk)
                warnings.warn(f"{path}:{n}: the last line was cut short (a run stopped while writing it); left out",
                              stacklevel=2)
                break
            raise DataError(f"{path}:{n} is not a JSON line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n} is JSON but not a record (a {type(record).__name__}, where each line of "
                            f"metrics.jsonl is an object); remove that line or give another file")
        if "loss" in record and "step" in record:
            if steps and record["step"] <= steps[-1]["step"]:
                steps, knn = [], [k for k in knn if k["step"] < record["step"]]
            steps.append(record)
        elif record.get("event") == "knn":
            knn.append(record)
        elif record.get("event") == "resume":
            steps = [r for r in steps if r["step"] <= record["step"]]
            knn = [k for k in knn if k["step"] <= record["step"]]
    if not steps:
        raise DataError(f"{path} holds no step records yet (they are written every log.every steps)")
    return name, steps, knn

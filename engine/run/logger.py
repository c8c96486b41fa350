"""JSON-lines metrics in the run folder, TensorBoard event files beside them, and a rich progress bar; loss terms
stay on the device between log steps."""
from __future__ import annotations

import json
import math
import secrets
import string
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dogo.engine.dist.distributed import all_reduce_mean
from dogo.core.io import atomic_write_text


class TensorBoardLog:
    """Event files in RUN/tb: every logged scalar with the optimiser step as x. A resumed run purges what a stopped
    run wrote after its checkpoint's step, so its curves continue without a fold."""

    def __init__(self, run_dir: Path, start_step: int, config_text: str):
        from torch.utils.tensorboard import SummaryWriter
        # the first step this run logs is start_step + 1: readers drop anything a stopped run wrote from there on
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"),
                                    purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("config", "```yaml\n" + config_text + "\n```", start_step + 1)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        for key, value in values.items():
            self.writer.add_scalar(prefix + key, value, step)
        self.writer.flush()  # at log steps only: a crash loses nothing already printed

    def close(self) -> None:
        self.writer.close()


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
        atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(mode=mode, dir=str(run_dir), id=run_id, resume="allow", project=project,
                              entity=entity or None, name=name, config=config,
                              settings=wandb.Settings(silent=True, console="off"))

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        self.run.log({prefix + k: v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(run_dir: Path, is_main: bool, start_step: int, log_cfg, config: dict, config_text: str) -> list:
    """The scalar sinks the main rank writes besides metrics.jsonl: TensorBoard and W&B, as log.* asks."""
    if not is_main:
        return []
    sinks: list = []
    if log_cfg.tensorboard == "on":
        sinks.append(TensorBoardLog(run_dir, start_step, config_text))
    if log_cfg.wandb != "off":
        sinks.append(WandbLog(run_dir, start_step, config, log_cfg.wandb, log_cfg.wandb_project,
                              log_cfg.wandb_entity, config.get("name", Path(run_dir).name)))
    return sinks


class MetricsLogger:
    def __init__(self, run_dir: Path, is_main: bool, total_steps: int, start_step: int, images_per_step: int,
                 world_size: int, progress: bool = False, sinks: list | None = None):
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.sinks = sinks or []  # TensorBoardLog, WandbLog: scalars(values, step, prefix), close()
        self.images_per_step, self.world_size = images_per_step, world_size
        self.console = Console(file=sys.stdout)
        show = progress  # log.progress, resolved by the config (on when stdout is a terminal)
        self.progress = None
        if is_main and show:
            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[speed]} img/s"), TextColumn("{task.fields[terms]}"),
                TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, epoch=0,
                                               speed="-", terms="")
            self.progress.start()
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0
        self._t0 = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """Accumulate one step's terms on the device: no host synchronisation."""
        for k, v in terms.items():
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
        self._steps += 1
        if self.progress is not None:
            self.progress.advance(self.task)

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
            if self.progress is not None:
                self.progress.update(self.task, epoch=epoch, speed=f"{speed:.1f}", terms=terms)
            else:
                self.console.print(f"step {step} epoch {epoch}  {speed:.1f} img/s  {terms}", highlight=False)
        return record

    def event(self, kind: str, message: str, **fields) -> None:
        """A one-off record (evaluation, checkpoint, warning), written and printed by the main rank."""
        if self.is_main:
            self._write({"event": kind, **fields})
            self.console.print(message, highlight=False)

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
        # NaN and inf are not JSON: written as null, and named, so that every line stays readable
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            record = {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        except OSError as exc:  # a write's error does not name its file: this one does (a full disk, a quota)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        for sink in self.sinks:
            sink.close()

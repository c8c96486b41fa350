"""The training loop: one step forwards every peer, backpropagates the summed loss once, updates all peers."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel

from dogo.engine import config as config_mod
from dogo.engine.config import Config
from dogo.engine.dist import distributed
from dogo.engine.dist.syncbn import convert_sync_batchnorm
from dogo.core.errors import ConfigError, DataError
from dogo.engine.eval.evaluate import KnnMonitor
from dogo.engine.eval.online import OnlineProbe
from dogo.core.precision import Precision
from dogo.core import checkpoint_files
from dogo.engine.run import checkpoint, memory, progress
from dogo.engine.run.graphs import StepGraph
from dogo.engine.run.guards import DivergenceWatch
from dogo.engine.run.logger import MetricsLogger, open_sinks
from dogo.engine.run.optim import build_optimizer, current_lr, lr_factor, set_lr
from dogo.engine.run.signals import StopRequest
from dogo.engine.ssl.objectives import objective_loss
from dogo.engine.ssl.peers import build_peers
from dogo.engine.ssl.targets import TargetMakers
from dogo.core.registry import BACKENDS
from dogo.pipelines import LoaderSpec, ViewBatch, build_loader


def ddp_options(model: torch.nn.Module, sync_bn: bool) -> dict:
    """DDP settings that leave the result unchanged and save work: gradients written straight into the all-reduce
    buckets (no copy, no second gradient buffer), and no broadcast of rank 0's buffers before each forward where
    every rank's buffers are equal anyway: with SyncBN (running statistics from the all-reduced batch statistics) or
    with no buffers at all (they are still synchronised once, at the start).

    The switch is `forward_sync_buffers` in the torch we pin, `broadcast_buffers` (the same before each forward)
    in the torch a GPU machine may already have (2.11 has no forward_sync_buffers): only what the installed DDP
    accepts is passed.

    Not static_graph, although every step's graph is the same: with it, torch 2.14's reducer reads a value on the
    host in every backward (aten::_local_scalar_dense; tests/test_host_sync.py, two gloo ranks, found it)."""
    has_buffers = any(True for _ in model.buffers())
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    sync = "forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"
    return {"gradient_as_bucket_view": True, sync: has_buffers and not sync_bn}


def usable_workers(requested: int) -> tuple[int, str | None]:
    """data.workers, at most the cores each rank on this node can have; with a line saying so when clamped."""
    cores = len(os.sched_getaffinity(0))
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    per_rank = max(1, cores // ranks_here)
    if requested <= per_rank:
        return requested, None
    return per_rank, (f"data.workers={requested} is more than the {per_rank} core(s) each of the {ranks_here} rank(s) "
                      f"on this node can use ({cores} cores): using {per_rank}")


@dataclass
class Position:
    """Where the run is: `step` counts optimiser steps; (epoch, step_in_epoch) is the next batch's place."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


class Trainer:
    def __init__(self, cfg: Config):
        config_mod.require_resolved(cfg)  # every `auto` was settled once, when the config was loaded
        self.cfg = cfg
        self.ctx = distributed.init(cfg.device, cfg.distributed.backend, cfg.distributed.timeout_min)
        graphs = cfg.precision.cuda_graphs == "on"
        if graphs and self.ctx.distributed:  # DDP's reducer is not captured (engine/run/graphs.py)
            raise ConfigError(f"precision.cuda_graphs=on runs on one process only; this run has "
                              f"{self.ctx.world_size} ranks: set precision.cuda_graphs=off under torchrun")
        self.run_dir = cfg.run_dir
        self.precision = Precision.of(cfg)
        self.precision.set_backend_flags(self.ctx.device)
        self.model = build_peers(cfg)
        # key encoders copy the peers before SyncBN: MoCo's keys use each rank's own batch statistics
        self.targets = TargetMakers(cfg, self.model.peers)
        if cfg.distributed.sync_bn and self.ctx.distributed:
            self.model = convert_sync_batchnorm(self.model)
            self.targets.sync_batchnorm()
        self.model.to(self.ctx.device, memory_format=self.precision.memory_format)
        self.targets.to(self.ctx.device, memory_format=self.precision.memory_format)
        # before any data is read: a step that cannot fit stops here, with the settings that would
        self.memory_estimate, self.memory_limit, warning = memory.check_fits(
            cfg, self.ctx.world_size, self.ctx.device, self.precision)
        workers, note = usable_workers(cfg.data.workers)
        for line in (warning, note):
            if line and self.ctx.is_main:
                Console(soft_wrap=True).print(line, highlight=False, markup=False)
        spec = LoaderSpec(plan=self.model.plan, recipe=cfg.augment, global_batch=cfg.data.batch_size, seed=cfg.seed,
                          rank=self.ctx.rank, world_size=self.ctx.world_size, device=self.ctx.device,
                          dtype=self.precision.dtype, channels_last=self.precision.channels_last,
                          compile_recipe=cfg.precision.compile in ("on", "peers"))
        self.loader = build_loader(dataclasses.replace(cfg.data, workers=workers), spec)
        if cfg.precision.compile == "peers":
            for peer in self.model.peers.values():
                peer.compile()  # in place: its state_dict keys (checkpoints) are unchanged
        self.forward = self.model
        if self.ctx.distributed:
            self.forward = DistributedDataParallel(
                self.model, device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda" else None,
                **ddp_options(self.model, cfg.distributed.sync_bn))
        self.optimizer = build_optimizer(dict(self.model.peers.items()), cfg, cfg.data.batch_size,
                                         self.ctx.device, static_lr=graphs)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.precision.scaler_enabled)
        spe = self.loader.steps_per_epoch
        self.total_steps = cfg.schedule.max_steps if cfg.schedule.max_steps > 0 else cfg.schedule.epochs * spe
        self.warmup_steps = round(cfg.schedule.warmup_epochs * spe)
        self.pos = Position()
        self.watch = DivergenceWatch(cfg.optim.lr)
        self.resume_changes: list[str] = []  # config keys a resume changed (lr, weight decay, schedule...)
        self.probe_restarted: str | None = None  # why a resume could not take the online probe's state
        # the wall time of the run's earlier sessions (from the checkpoint it resumed from; None: not recorded there)
        self.earlier_seconds: float | None = 0.0
        self.resumed_from: Path | None = None  # the checkpoint this session started from
        self._start: float | None = None  # when this session's fit() began (time.perf_counter)
        self.lock: checkpoint.RunLock | None = None  # the run folder's, held by the main rank while it trains
        self.knn, self.probe = None, None  # the val split's evaluations: kNN monitor, online probe
        labelled = BACKENDS.get(cfg.data.backend, "data.backend").labelled and cfg.data.labels == "folders"
        if (cfg.eval.knn_every_epochs > 0 or cfg.eval.online_probe == "on") and labelled:
            self.knn = KnnMonitor(cfg, self.ctx, self.precision, workers)
        if cfg.eval.online_probe == "on":
            self.probe = OnlineProbe(self.model.peers, len(self.knn.train_split.classes), cfg.eval.online_probe_lr,
                                     cfg.seed, self.ctx.device, self.ctx.distributed)
        # the step's device work: eager, or captured once and replayed (engine/run/graphs.py)
        self.graph = StepGraph(self._device_step, self.ctx.device) if graphs else None

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "peers": {name: p.state_dict() for name, p in self.model.peers.items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "targets": self.targets.checkpoint_state(),
            **({"online_probe": self.probe.state_dict()} if self.probe else {}),
            "position": vars(self.pos).copy(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "config": config_mod.to_dict(self.cfg),
            "world_size": self.ctx.world_size,
            "wall_seconds": self.run_seconds(),
        }

    def run_seconds(self) -> float | None:
        """Wall time of the run so far, over all its sessions (each up to its last checkpoint, then this one's so
        far); None when the checkpoint it resumed from did not record the earlier sessions'."""
        if self.earlier_seconds is None:
            return None
        return self.earlier_seconds + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def save(self) -> Path | None:
        """The checkpoint of this step, unless its weights or optimiser state diverged: then nothing is written (and
        so nothing older is pruned) and the run stops naming the newest good checkpoint. Every rank checks (they hold
        the same weights), so all stop together."""
        self.watch.require_sane_weights(self.model.peers, self.optimizer, self.pos.step, self.run_dir)
        path = None
        if self.ctx.is_main:
            path = checkpoint.save(self.run_dir, self.state_dict(), self.pos.step, self.cfg.checkpoint.keep)
        distributed.barrier()
        return path

    def resume(self) -> Path | None:
        spec = self.cfg.checkpoint.resume
        if spec == "none":
            return None
        path = checkpoint_files.latest(self.run_dir) if spec == "latest" else Path(spec)
        if path is None:
            return None
        state = checkpoint_files.load(path)
        saved = config_mod.to_dict(config_mod.stored(state["config"]))  # in today's layout
        checkpoint.check_compatible(saved, config_mod.to_dict(self.cfg), path)
        checkpoint.load_peers(self.model.peers, state, path)
        if self.targets.active:
            self.targets.load_checkpoint_state(state["targets"], path)
        if self.probe and "online_probe" in state:  # a probe turned on at a resume starts from scratch
            self.probe_restarted = self.probe.load_state_dict(state["online_probe"])
        # the optimiser's state (momenta) comes from the checkpoint; its settings (lr, weight decay, momentum...)
        # from this run's config, which may have changed them: load_state_dict alone would bring back the old ones
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
        self.resume_changes = checkpoint.changed_settings(saved, config_mod.to_dict(self.cfg))
        self.scaler.load_state_dict(state["scaler"])
        self.pos = Position(**state["position"])
        self.earlier_seconds = state.get("wall_seconds")  # checkpoints before it was recorded have none
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return path

    # -- the loop ---------------------------------------------------------------------------------------------
    def step(self, batch: ViewBatch) -> dict[str, torch.Tensor]:
        """One optimiser step over every peer on one batch. No host synchronisation. What the step number decides
        (the lr, a momentum) is written here, on the host; the rest is `_device_step`, which a CUDA graph may
        capture and replay."""
        set_lr(self.optimizer, lr_factor(self.pos.step, self.total_steps, self.warmup_steps,
                                         self.cfg.schedule.final_lr_ratio))
        self.targets.schedule(self.pos.step + 1, self.total_steps, self.loader.steps_per_epoch)
        if self.graph is not None and self.pos.step >= self.targets.eager_steps:
            return self.graph(batch.groups, batch.labels)
        return self._device_step(batch.groups, batch.labels)

    def _device_step(self, groups: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward, loss, backward, update and the method states' updates: the same kernels at every step, with
        what changes between steps read from device tensors (engine/run/graphs.py)."""
        with self.precision.autocast(self.ctx.device):
            if self.probe:
                self.probe.capturing = True  # the backbones' features of this forward, for the online probe
            outputs = self.forward(groups)
            if self.probe:
                self.probe.capturing = False
            targets = self.targets.make(ViewBatch(groups, labels), self.model.plan, self.model.sets)
        loss, terms = objective_loss(outputs, self.cfg.objective, self.cfg.peers, targets)
        self.watch.note(loss)  # a flag on the device, read only at log and checkpoint steps
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad_norm, foreach=True)
        self.targets.before_update(self.model.peers)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.targets.after_step(self.model.peers, targets)
        if self.probe:
            terms = {**terms, **self.probe.step(labels)}
        return terms

    def guarded_step(self, batch) -> dict[str, torch.Tensor]:
        """step(), with running out of device memory turned into a one-line error naming the step and what to
        lower. Nothing is saved on the way out: the last good checkpoint stays the newest."""
        try:
            return self.step(batch)
        except torch.OutOfMemoryError:
            fits = memory.memory_model(self.cfg, self.ctx.world_size, self.precision).largest_batch(self.memory_limit)
            raise ConfigError(
                f"out of {self.ctx.device.type.upper()} memory at step {self.pos.step + 1}: the estimate was "
                f"{self.memory_estimate.total / 2 ** 30:.1f} GiB per rank of "
                f"{self.memory_limit / 2 ** 30:.1f} GiB available; "
                f"lower data.batch_size (now {self.cfg.data.batch_size}; the estimate says {fits} fits), "
                f"objective.tile (now {self.cfg.objective.tile}), or set precision.dtype=bf16") from None

    def lrs(self) -> dict[str, float]:
        return {g["peer"]: current_lr(g) for g in self.optimizer.param_groups}

    def evaluate(self, log: MetricsLogger, knn: bool, probe: bool) -> dict[str, float]:
        """At an epoch end: the kNN monitor's and the online probe's val top-1 of every peer, from one extraction of
        the val split's features per peer; returns the kNN's. An evaluation that gives no number (a split none of
        whose images decode, scores that are not finite) is skipped with an event saying why: the monitor does not
        stop the training it watches."""
        knn_top1, probe_top1 = {}, {}
        t0 = time.perf_counter()
        log.activity = "evaluating"  # what the heartbeat says meanwhile
        try:
            for name, peer in self.model.peers.items():
                val = self.knn.val_features(peer.backbone)
                if knn:
                    knn_top1[name] = self.knn.top1(peer.backbone, val)
                if probe:
                    probe_top1[name] = self.probe.top1(name, *val)
        except (DataError, ConfigError) as exc:
            self._eval_seconds += time.perf_counter() - t0
            log.activity = None
            log.event("evaluation_skipped", f"skipped the evaluation at step {self.pos.step}: {exc}",
                      step=self.pos.step, epoch=self.pos.epoch, reason=str(exc))
            return {}
        self._eval_seconds += time.perf_counter() - t0
        log.activity = None
        trained_for = round(time.perf_counter() - self._start - self._eval_seconds, 1)
        if knn:
            log.knn(self.pos.step, self.pos.epoch, knn_top1, trained_for)
        if probe:
            log.online_probe(self.pos.step, self.pos.epoch, probe_top1)
        return knn_top1

    def fit(self) -> dict:
        """Train to `total_steps` (or until SIGTERM/SIGINT), resuming first when the config says so."""
        try:
            log = self._open_run()
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise
        stop = StopRequest(self.ctx)
        result = {"stopped": False, "exit_code": 0, "knn_top1": {}, "knn_step": None, "checkpoint": self.resumed_from}
        start_step = self.pos.step
        self._start = time.perf_counter()
        self._eval_seconds = 0.0  # time spent in the kNN monitor, left out of the training time it reports
        self.watch.finite_until = self.pos.step
        try:
            while self.pos.step < self.total_steps and not result["stopped"]:
                self.loader.set_epoch(self.pos.epoch, self.pos.step_in_epoch)
                for batch in self.loader:
                    log.add(self.guarded_step(batch))
                    if self._after_step(batch, log, stop, result):
                        break
            if not result["stopped"]:
                self._finish(log, result, start_step)
            return result
        finally:
            try:
                stop.close()
                log.close()
            finally:  # a sink that cannot close (a full disk) still hands the run folder on
                if self.lock is not None:
                    self.lock.release()

    def _finish(self, log: MetricsLogger, result: dict, start_step: int) -> None:
        """The "done" event and the end summary: steps, time, last loss and kNN, checkpoint, what to run next."""
        skipped = len(self.loader.skipped)
        session = time.perf_counter() - self._start
        total = self.run_seconds()
        peers = list(self.model.peers)
        text = progress.summary(self.pos.step, total, session, start_step, log.last_loss, result["knn_top1"],
                                result["knn_step"], result["checkpoint"], skipped, self.run_dir, peers)
        log.event("done", text, step=self.pos.step, skipped=skipped, seconds=round(session, 1),
                  run_seconds=None if total is None else round(total, 1),
                  last_loss=log.last_loss[1] if log.last_loss else None, knn_top1=result["knn_top1"],
                  checkpoint=None if result["checkpoint"] is None else str(result["checkpoint"]),
                  next=progress.next_commands(self.run_dir, peers))

    def _banner(self, resumed: Path | None) -> str:
        loader = self.loader
        return progress.banner(
            self.run_dir, resumed, self.pos.step, self.total_steps, loader.steps_per_epoch, loader.num_images,
            loader.num_classes, loader.where, self.cfg.data.batch_size, self.ctx.world_size, self.ctx.device.type,
            {name: f"{p.arch} ({p.ssl})" for name, p in self.cfg.peers.items()}, f"objective {self.cfg.objective.name}")

    def _open_run(self) -> MetricsLogger:
        aside, stale = None, []
        if self.ctx.is_main:
            self.lock = checkpoint.RunLock(self.run_dir)  # before anything in the folder is touched
            stale = checkpoint.remove_stale_temporaries(self.run_dir)
            if self.cfg.checkpoint.resume == "none":
                aside = checkpoint.set_aside(self.run_dir, time.strftime("%Y%m%d_%H%M%S"))
        distributed.barrier()
        resumed = self.resumed_from = self.resume()
        if self.ctx.is_main:  # only once the checkpoint check has passed: a refused resume leaves the old one
            config_mod.dump(self.cfg, self.run_dir / "config.yaml")
        sinks = open_sinks(self.run_dir, self.ctx.is_main, self.pos.step, self.cfg.log, config_mod.to_dict(self.cfg),
                           config_mod.dump_text(self.cfg))
        log = MetricsLogger(self.run_dir, self.ctx.is_main, self.total_steps, self.pos.step,
                            self.cfg.data.batch_size, self.ctx.world_size, progress=self.cfg.log.progress == "on",
                            sinks=sinks, steps_per_epoch=self.loader.steps_per_epoch, start_epoch=self.pos.epoch,
                            heartbeat_s=self.cfg.log.heartbeat_s)
        try:
            self._announce(log, resumed, aside, stale)
        except BaseException:  # a full disk: the sinks and the heartbeat stop with the run
            with contextlib.suppress(Exception):  # the error to name is the first one
                log.close()
            raise
        return log

    def _announce(self, log: MetricsLogger, resumed: Path | None, aside: Path | None, stale: list) -> None:
        """The start banner, then the events of opening the run folder (a taken-over lock, removed temporaries,
        checkpoints set aside, a resume and what it changed), and the "start" record."""
        log.say(self._banner(resumed))
        if self.lock is not None and self.lock.taken_over:
            log.event("lock_taken_over", f"took over the run folder's lock from process {self.lock.taken_over}, "
                      f"which is no longer running", pid=self.lock.taken_over)
        if stale:
            log.event("stale_temporaries", f"removed {len(stale)} half-written checkpoint file(s) left by a killed "
                      f"run: {', '.join(p.name for p in stale)}", files=[str(p) for p in stale])
        if aside:
            log.event("checkpoints_set_aside", f"a fresh start: the earlier checkpoints in this run folder moved to "
                      f"{aside}", path=str(aside))
        if resumed:
            log.event("resume", None, path=str(resumed), step=self.pos.step)  # the banner said it
            if self.resume_changes:
                log.event("resume_settings", "settings changed since the checkpoint, applied from now on: "
                          + "; ".join(self.resume_changes), changes=self.resume_changes)
            if self.probe_restarted:
                log.event("online_probe_restarted", self.probe_restarted, reason=self.probe_restarted)
        log.event("start", None, step=self.pos.step, total_steps=self.total_steps, images=self.loader.num_images,
                  classes=self.loader.num_classes, steps_per_epoch=self.loader.steps_per_epoch,
                  world_size=self.ctx.world_size, resumed_from=str(resumed) if resumed else None)

    def _after_step(self, batch, log: MetricsLogger, stop: StopRequest, result: dict) -> bool:
        """Advance the position, then log, checkpoint, evaluate and heed signals. True ends the epoch's loop."""
        cfg = self.cfg
        epoch = self.pos.epoch  # the one this batch belonged to
        self.pos.step += 1
        self.pos.step_in_epoch += 1
        if self.pos.step_in_epoch == self.loader.steps_per_epoch:  # the next batch opens the next epoch
            self.pos.epoch += 1
            self.pos.step_in_epoch = 0
        epoch_end = self.pos.step_in_epoch == 0
        last = self.pos.step == self.total_steps
        log.step_done(self.pos.step, epoch)
        if batch.skipped:
            log.event("skipped", f"skipped {len(batch.skipped)} undecodable file(s): {batch.skipped[0]}",
                      files=batch.skipped)
        if self.pos.step % cfg.log.every == 0 or last:
            self.watch.require_finite(self.pos.step, log.flush(self.pos.step, self.pos.epoch, self.lrs()))
        if stop.should_stop():
            self.watch.require_finite(self.pos.step)
            path = self.save()
            log.event("stopped", f"stopped by signal ({stop.name}) at step {self.pos.step}; checkpoint {path}; "
                                 f"run the same command again to resume (exit code {stop.exit_code})",
                      step=self.pos.step, signal=stop.name, exit_code=stop.exit_code)
            result.update(stopped=True, exit_code=stop.exit_code, checkpoint=path)
            return True
        every = cfg.checkpoint.every_steps
        if epoch_end or last or (every and self.pos.step % every == 0):
            self.watch.require_finite(self.pos.step)  # never a checkpoint of diverged weights, so none pruned for one
            result["checkpoint"] = self.save()
        knn_on = self.knn is not None and cfg.eval.knn_every_epochs > 0
        knn_due = knn_on and ((epoch_end and self.pos.epoch % cfg.eval.knn_every_epochs == 0) or last)
        probe_due = self.probe is not None and (epoch_end or last)
        if knn_due or probe_due:
            knn_top1 = self.evaluate(log, knn_due, probe_due)
            if knn_top1:
                result.update(knn_top1=knn_top1, knn_step=self.pos.step)
        return last


def train(cfg: Config) -> dict:
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
        result["run_dir"] = str(trainer.run_dir)
        result["step"] = trainer.pos.step
        result["run_seconds"] = trainer.run_seconds()  # every session's, a killed one's up to its last checkpoint
        return result
    finally:
        distributed.shutdown()

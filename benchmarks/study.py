"""Studies: methods compared under one protocol, one arm at a time, merged into one table.

A study file (configs/study_*.yaml) names its arms (a training config and overrides each; an arm may take another
arm's run of the same seed as its frozen teacher), the budget every arm trains for (epochs, or steps where an epoch is
too long), the batch, the seeds, and the evaluation every arm gets the same way:
- kNN top-1 of every peer with the dino (k=20, T=0.07) and the lightly (k=200, T=0.1) presets, the whole training
  split as the bank, on the val split; the curve of kNN against epochs from the run's own kNN monitor, ending at
  that final evaluation;
- the online probe's last val top-1 where the arm trains one, and the standard linear probe where the study asks;
- the baselines, once per seed for the whole study (baselines_sSEED.json): the same kNN of raw pixels and of the
  architectures the study names at their random initialisation.
Each arm's run writes ONE small JSON (atomically), with its wall and device seconds (GPU-seconds on a GPU, the CPU's
wall seconds on a CPU), images seen and the environment, so arms run on different days or machines merge: `table`
reads every arm file of a folder into a table (mean +- spread over seeds per arm and peer) as JSON and Markdown, and a
plot of kNN against epochs for all arms.

    dogo study run STUDY.yaml --out DIR [--runs DIR] [--data PATH] [--arms A ...] [--seeds S ...]
        [--set key=value ...] [--force]
    dogo study table DIR [--study STUDY.yaml]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from dogo.core.errors import CheckpointError, ConfigError, DataError, suggest
from dogo.core.io import write_json
from dogo.core.registry import BACKBONES

KNN_PRESETS = ("dino", "lightly")  # engine.config.KNN_PROTOCOLS' presets every arm is evaluated with


# ---- the study file ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    name: str
    config: Path  # the training config (a path relative to the study file, or absolute)
    overrides: tuple[str, ...] = ()  # key=value on top of the config and the study's own
    teacher: str | None = None  # the arm whose run of the same seed is this arm's frozen teacher (teacher.checkpoint)


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    batch_size: int  # every arm's data.batch_size
    seeds: tuple[int, ...]
    arms: dict[str, Arm]
    epochs: int | None = None  # every arm's budget, the same images seen by every arm: schedule.epochs ...
    steps: int | None = None  # ... or schedule.max_steps, where an epoch is more than the machine can give an arm
    knn_every_epochs: int = 1  # the kNN monitor's curve: a point every this many epochs; 0: the final one only
    curve_protocol: str = "dino"  # the kNN preset of the curve
    linear_probe_epochs: int = 0  # the standard linear probe after training, this many epochs; 0: none
    # architectures at their random initialisation (each {arch, cifar_stem}), and raw pixels, once per seed
    baselines: tuple[dict, ...] = ()
    overrides: tuple[str, ...] = ()  # for every arm
    published: tuple[dict, ...] = ()  # figures from elsewhere, shown beside the arms they correspond to
    about: str = ""


_STUDY_KEYS = {f.name for f in dataclasses.fields(Study)} - {"path"}
_ARM_KEYS = {"config", "overrides", "teacher"}


def load_study(path: str | Path) -> Study:
    """A study file, checked: unknown keys (with the nearest valid one), missing configs, unknown or circular
    teachers and budgets that are not positive are ConfigErrors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist; the shipped ones are configs/study_*.yaml")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of study keys")
    _known(raw, _STUDY_KEYS, path, "")
    for key in ("name", "batch_size", "seeds", "arms"):
        if key not in raw:
            raise ConfigError(f"{path}: '{key}' is missing (a study names its budget, batch, seeds and arms)")
    if ("epochs" in raw) == ("steps" in raw):
        raise ConfigError(f"{path}: give the budget as epochs or as steps (one of them)")
    arms = {}
    for name, spec in (raw["arms"] or {}).items():
        spec = spec if isinstance(spec, dict) else {"config": spec}
        _known(spec, _ARM_KEYS, path, f"arms.{name}.")
        if "config" not in spec:
            raise ConfigError(f"{path}: arms.{name} names no config")
        config = Path(spec["config"])
        config = config if config.is_absolute() else path.parent / config
        if not config.is_file():
            raise ConfigError(f"{path}: arms.{name}.config {spec['config']} does not exist (a path relative to the "
                              f"study file)")
        arms[name] = Arm(name, config, tuple(spec.get("overrides") or ()), spec.get("teacher"))
    baselines = tuple({"arch": b, "cifar_stem": False} if isinstance(b, str) else
                      {"arch": b.get("arch"), "cifar_stem": bool(b.get("cifar_stem", False))}
                      for b in raw.get("baselines") or ())
    study = Study(name=str(raw["name"]), path=path, batch_size=int(raw["batch_size"]),
                  seeds=tuple(int(s) for s in raw["seeds"]), arms=arms,
                  epochs=int(raw["epochs"]) if "epochs" in raw else None,
                  steps=int(raw["steps"]) if "steps" in raw else None,
                  knn_every_epochs=int(raw.get("knn_every_epochs", 1)),
                  curve_protocol=str(raw.get("curve_protocol", "dino")),
                  linear_probe_epochs=int(raw.get("linear_probe_epochs", 0)), baselines=baselines,
                  overrides=tuple(raw.get("overrides") or ()), published=tuple(raw.get("published") or ()),
                  about=str(raw.get("about", "")))
    _check(study)
    return study


def _known(raw: dict, valid: set[str], path: Path, prefix: str) -> None:
    for key in raw:
        if key not in valid:
            raise ConfigError(f"{path}: unknown key '{prefix}{key}'" + suggest(str(key), sorted(valid)))


def _check(study: Study) -> None:
    where = study.path
    if (study.epochs or study.steps or 0) < 1 or study.batch_size < 1 or not study.seeds or not study.arms:
        raise ConfigError(f"{where}: the budget and batch_size must be positive, seeds and arms not empty")
    for b in study.baselines:
        BACKBONES.get(str(b["arch"]), "baselines.arch")
    if study.curve_protocol not in KNN_PRESETS:
        raise ConfigError(f"{where}: curve_protocol must be one of {', '.join(KNN_PRESETS)}")
    for arm in study.arms.values():
        if arm.teacher is not None and arm.teacher not in study.arms:
            raise ConfigError(f"{where}: arms.{arm.name}.teacher {arm.teacher!r} is not an arm of the study"
                              + suggest(arm.teacher, sorted(study.arms), "arms"))
    for name in study.arms:
        order(study, [name])  # a teacher chain that comes back to itself is an error
    for row in study.published:
        if not isinstance(row, dict) or row.get("arm") not in study.arms:
            raise ConfigError(f"{where}: every published row names one of the study's arms (arm: NAME), got {row!r}")


def order(study: Study, names: list[str]) -> list[str]:
    """`names` and the teachers they need, each teacher before its students."""
    out: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise ConfigError(f"{study.path}: the teachers of arm {name} come back to it ({' -> '.join(chain)})")
        teacher = study.arms[name].teacher
        if teacher is not None:
            visit(teacher, (*chain, name))
        if name not in out:
            out.append(name)
    for name in names:
        if name not in study.arms:
            raise ConfigError(f"arm {name!r} is not in {study.path}" + suggest(name, sorted(study.arms), "arms"))
        visit(name, ())
    return out


# ---- one arm -------------------------------------------------------------------------------------------------------

def arm_file(out: Path, arm: str, seed: int) -> Path:
    return Path(out) / f"{arm}_s{seed}.json"


def run_name(arm: str, seed: int) -> str:
    return f"{arm}_s{seed}"


def arm_overrides(study: Study, arm: Arm, seed: int, runs: Path, data: str | None, extra: tuple[str, ...] = ()
                  ) -> list[str]:
    """Everything an arm's run is given beyond its config: the study's protocol first (budget, batch, seed, the
    kNN monitor), then the study's and the arm's overrides, then the caller's (e.g. device=cpu)."""
    budget = [f"schedule.epochs={study.epochs}", "schedule.max_steps=0"] if study.epochs else \
        [f"schedule.max_steps={study.steps}"]
    protocol = [f"name={run_name(arm.name, seed)}", f"out_dir={runs}", f"seed={seed}", *budget,
                f"data.batch_size={study.batch_size}",
                f"eval.knn_every_epochs={study.knn_every_epochs}", f"eval.knn_protocol={study.curve_protocol}",
                "eval.knn_k=null", "eval.knn_temperature=null", "eval.knn_bank_images=0"]
    if data is not None:
        protocol.append(f"data.path={data}")
    if arm.teacher is not None:
        protocol.append(f"teacher.checkpoint={runs / run_name(arm.teacher, seed)}")
    return [*protocol, *study.overrides, *arm.overrides, *extra]


def run_arm(study: Study, arm_name: str, seed: int, *, out: str | Path, runs: str | Path | None = None,
            data: str | None = None, extra: tuple[str, ...] = ()) -> Path | None:
    """Train one arm to its budget (resuming its run folder if it has checkpoints), evaluate it, write its JSON.
    Returns the JSON's path, or None when a signal stopped the training (its checkpoint is saved: call again)."""
    from dogo.engine import config as config_mod
    from dogo.engine.run.trainer import train
    out = Path(out)
    runs = Path(runs) if runs is not None else out / "runs"
    arm = study.arms[arm_name]
    if arm.teacher is not None and not arm_file(out, arm.teacher, seed).is_file():
        raise ConfigError(f"arm {arm_name} learns from arm {arm.teacher}'s run (seed {seed}), which has not finished: "
                          f"run arm {arm.teacher} first (`run` with its dependencies does)")
    overrides = arm_overrides(study, arm, seed, runs, data, extra)
    cfg = config_mod.load(arm.config, overrides)
    run_dir = Path(cfg.run_dir)
    result = train(cfg)
    # the run's own clock, over every session that trained it: a session killed outright (no signal handler ran)
    # counts up to its last checkpoint, and the steps after it are trained again and counted again
    train_seconds = result["run_seconds"]
    gc.collect()  # the trainer's held split and model, before the evaluation builds its own (one GPU, many arms)
    if result["stopped"]:
        return None
    start = time.perf_counter()
    evaluation = evaluate_run(run_dir, linear_probe_epochs=study.linear_probe_epochs)
    eval_seconds = time.perf_counter() - start
    return write_json(arm_file(out, arm_name, seed), _arm_record(
        study, arm, seed, cfg, overrides, run_dir, evaluation, train_seconds, eval_seconds))


def _arm_record(study: Study, arm: Arm, seed: int, cfg, overrides: list[str], run_dir: Path, evaluation: dict,
                train_seconds: float | None, eval_seconds: float) -> dict:
    from dogo.engine import config as config_mod
    device = evaluation["environment"]["device"]
    on_gpu = device.startswith("cuda")
    world = evaluation["world_size"]
    return {
        "study": study.name, "arm": arm.name, "seed": seed, "config": str(arm.config), "overrides": overrides,
        "teacher_arm": arm.teacher, "run_dir": str(run_dir),
        "peers": {n: p.arch for n, p in cfg.peers.items()}, "objective": cfg.objective.name,
        # the budget; with a budget in steps, the passes over the training split those steps make
        "epochs": study.epochs or evaluation["step"] * cfg.data.batch_size / evaluation["bank_images"],
        "batch_size": cfg.data.batch_size, "steps": evaluation["step"],
        "images_seen": evaluation["step"] * cfg.data.batch_size,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        # GPU-seconds: wall time x GPUs; on a CPU the wall time of the whole machine's cores
        # None: the run resumed from a checkpoint that predates the run clock (wall_seconds), so its time is unknown
        "device_seconds": None if train_seconds is None else (train_seconds + eval_seconds) * (world if on_gpu else 1),
        "device_seconds_are": "GPU-seconds (wall x GPUs)" if on_gpu else "CPU wall seconds",
        **{k: v for k, v in evaluation.items() if k not in ("environment", "world_size", "step")},
        "resolved_config": config_mod.to_dict(cfg), "environment": evaluation["environment"],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---- evaluation ----------------------------------------------------------------------------------------------------

def evaluate_run(run_dir: str | Path, *, linear_probe_epochs: int = 0) -> dict:
    """Every peer of the run's newest checkpoint: kNN with both presets over the whole training split on the val
    split, the online probe's last val top-1 and the kNN curve from its metrics.jsonl (ending at this evaluation),
    and the standard linear probe (linear_probe_epochs > 0)."""
    from dogo.engine.eval.linear import standard_probe
    from dogo.engine.eval.saved import SavedRun
    run_dir = Path(run_dir)
    run = SavedRun.open(run_dir)
    cfg = run.cfg
    with _evaluation(cfg) as (ctx, precision, train, val):
        trained = run.peers(ctx.device)
        step = run.step
        record = {"checkpoint": str(run.path), "step": step, "world_size": ctx.world_size,
                  "bank_images": len(train), "val_images": len(val),
                  "knn": {n: _knn_both(p.backbone, train, val, cfg, ctx, precision) for n, p in trained.peers.items()}}
        record.update(_curves(run_dir, cfg, step, step * cfg.data.batch_size / len(train), record["knn"]))
        if linear_probe_epochs > 0:
            record["linear_probe"] = {n: {**standard_probe(p.backbone, train, val, recipe=cfg.augment, ctx=ctx,
                                                           precision=precision, epochs=linear_probe_epochs,
                                                           seed=cfg.seed), "epochs": linear_probe_epochs}
                                      for n, p in trained.peers.items()}
        record["environment"] = _environment(ctx)
        return record


def evaluate_baselines(cfg, archs: tuple[dict, ...]) -> dict:
    """kNN (both presets) of raw pixels and of each architecture in `archs` at its random initialisation with the
    config's seed, on the config's splits: what every arm of a study stands beside."""
    import torch

    from dogo.engine.eval.evaluate import pixel_features
    from dogo.models import build_backbone
    with _evaluation(cfg) as (ctx, precision, train, val):
        pixels = [pixel_features(s, np.arange(len(s)), batch_size=cfg.eval.batch_size, recipe=cfg.augment,
                                 device=ctx.device) for s in (train, val)]
        record = {"seed": cfg.seed, "bank_images": len(train), "val_images": len(val),
                  "raw_pixels": _knn_presets(*pixels[0], *pixels[1], len(train.classes)), "random_init": []}
        for b in archs:
            torch.manual_seed(cfg.seed)
            backbone, _ = build_backbone(b["arch"], b["cifar_stem"], key="baselines.arch",
                                         image_size=cfg.data.image_size)
            backbone.to(ctx.device, memory_format=precision.memory_format)
            record["random_init"].append({**b, **_knn_both(backbone, train, val, cfg, ctx, precision)})
        record["environment"] = _environment(ctx)
        return record


@contextlib.contextmanager
def _evaluation(cfg):
    """(ctx, precision, training split, val split) for evaluating under `cfg`; the process group closed after."""
    from dogo.engine.dist import distributed
    from dogo.core.precision import Precision
    from dogo.pipelines import open_eval_split
    ctx = distributed.init(cfg.device, cfg.distributed.backend, cfg.distributed.timeout_min)
    try:
        splits = [open_eval_split(cfg.data, s, cfg.data.workers) for s in (cfg.data.train_split, cfg.data.val_split)]
        yield ctx, Precision.of(cfg), *splits
    finally:
        distributed.shutdown()


def _environment(ctx) -> dict:
    from dogo.core.environment import environment
    return environment(ctx.device)


def _knn_both(backbone, train, val, cfg, ctx, precision) -> dict[str, float]:
    """kNN top-1 of `backbone` with each preset, from one extraction of each split's features."""
    from dogo.engine.eval.evaluate import extract_features
    feats = [extract_features(backbone, s, np.arange(len(s)), batch_size=cfg.eval.batch_size, recipe=cfg.augment,
                              ctx=ctx, precision=precision) for s in (train, val)]
    return _knn_presets(*feats[0], *feats[1], len(train.classes))


def _knn_presets(bank, bank_y, queries, y, classes: int) -> dict[str, float]:
    from dogo.engine.config import KNN_PROTOCOLS
    from dogo.engine.eval.evaluate import knn_predict, topk_accuracy
    return {p: topk_accuracy(knn_predict(bank, bank_y, queries, classes, *KNN_PROTOCOLS[p]), y, ks=(1,))["top1"]
            for p in KNN_PRESETS}


def _curves(run_dir: Path, cfg, step: int, epochs: float, final: dict[str, dict[str, float]]) -> dict:
    """The kNN monitor's points (epoch, step, training seconds, top-1 per peer), ending with this evaluation's (in the
    curve's preset) unless the monitor measured that step itself, and the online probe's last val top-1, from the
    run's metrics.jsonl (a restart's or resume's replayed records dropped, as `dogo plot` does)."""
    import json

    from dogo.engine.config import knn_protocol_name
    from dogo.engine.run.logger import read_metrics
    _, _, knn = read_metrics(run_dir)
    curve = [{k: e.get(k) for k in ("epoch", "step", "train_seconds", "top1")} for e in knn]
    if not curve or curve[-1]["step"] != step:
        curve.append({"epoch": epochs, "step": step, "train_seconds": None,
                      "top1": {n: v[cfg.eval.knn_protocol] for n, v in final.items()}})
    probe = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"online_probe"' in line]
    return {"knn_curve": curve, "knn_curve_protocol": knn_protocol_name(cfg.eval),
            "online_probe": probe[-1]["top1"] if probe else None}


def baselines_file(out: Path, seed: int) -> Path:
    return Path(out) / f"baselines_s{seed}.json"


def run_baselines(study: Study, seed: int, *, out: str | Path, runs: str | Path | None = None,
                  data: str | None = None, extra: tuple[str, ...] = ()) -> Path:
    """The study's baselines for one seed, under its first arm's data and evaluation settings; one JSON."""
    from dogo.engine import config as config_mod
    out = Path(out)
    arm = next(iter(study.arms.values()))
    cfg = config_mod.load(arm.config, arm_overrides(study, arm, seed, Path(runs or out / "runs"), data, extra))
    return write_json(baselines_file(out, seed), {"study": study.name, **evaluate_baselines(cfg, study.baselines)})


# ---- a whole study ---------------------------------------------------------------------------------------------------

def run_study(study: Study, *, out: str | Path, runs: str | Path | None = None, data: str | None = None,
              arms: list[str] | None = None, seeds: list[int] | None = None, extra: tuple[str, ...] = (),
              force: bool = False, log=print) -> list[Path]:
    """Run the named arms (default: all) for each seed, teachers first (added when not named), skipping those whose
    JSON exists (unless `force`); stops at the first arm a signal stops. Returns the arm files written."""
    wanted = order(study, arms or list(study.arms))
    added = [a for a in wanted if arms and a not in arms]
    if added:
        log(f"adding the teacher arm(s) {', '.join(added)}: their runs are needed first")
    written = []
    for seed in seeds if seeds is not None else study.seeds:
        if study.baselines and (force or not baselines_file(out, seed).is_file()):
            log(f"baselines seed {seed}: raw pixels and {', '.join(b['arch'] for b in study.baselines)} at random "
                f"initialisation ...")
            written.append(run_baselines(study, seed, out=out, runs=runs, data=data, extra=extra))
        for name in wanted:
            target = arm_file(out, name, seed)
            if target.is_file() and not force:
                log(f"{name} seed {seed}: done ({target})")
                continue
            log(f"{name} seed {seed}: training ...")  # its run's banner gives its steps (an arm may set its own)
            path = run_arm(study, name, seed, out=out, runs=runs, data=data, extra=extra)
            if path is None:
                log(f"{name} seed {seed}: stopped by a signal; its checkpoint is saved, the same command resumes it")
                return written
            written.append(path)
            log(f"{name} seed {seed}: wrote {path}")
    return written


# ---- the table -------------------------------------------------------------------------------------------------------

def read_arm_files(folder: str | Path) -> list[dict]:
    """Every arm file of a study's output folder (NAME_sSEED.json with an 'arm' key), sorted by arm and seed."""
    import json
    records = []
    for path in sorted(Path(folder).glob("*_s*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not a readable arm file ({exc}); remove it or run its arm again") from None
        if isinstance(record, dict) and "arm" in record and "knn" in record:
            record["_file"] = path.name
            records.append(record)
    if not records:
        raise DataError(f"{folder}: no arm files (ARM_sSEED.json) there yet; run the study's arms first")
    return sorted(records, key=lambda r: (r["arm"], r["seed"]))


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), n, and the values."""
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def _spread_known(values: list[float | None]) -> dict | None:
    """spread() of values every seed has; None when one lacks it (a probe that was off, a time not recorded)."""
    return spread(values) if values and all(v is not None for v in values) else None


def merge(folder: str | Path, study: Study | None = None) -> dict:
    """The table of a study's arm files: per arm and peer, kNN (both presets), online and linear probe as mean +-
    spread over seeds, GPU- (or CPU-) seconds and images seen; the baselines (raw pixels, random init per
    architecture, from the baselines files) and the study's published figures beside them."""
    records = read_arm_files(folder)
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["arm"], []).append(r)
    rows = []
    for arm, members in groups.items():
        for peer, arch in members[0]["peers"].items():
            row = {"arm": arm, "peer": peer, "arch": arch, "objective": members[0]["objective"],
                   "seeds": [m["seed"] for m in members], "epochs": members[0]["epochs"],
                   "batch_size": members[0]["batch_size"], "images_seen": members[0]["images_seen"],
                   "device_seconds": _spread_known([m["device_seconds"] for m in members]),
                   "train_seconds": _spread_known([m["train_seconds"] for m in members]),
                   "device_seconds_are": members[0]["device_seconds_are"],
                   "files": [m["_file"] for m in members]}
            for preset in KNN_PRESETS:
                row[f"knn_{preset}"] = spread([m["knn"][peer][preset] for m in members])
            for key, pick in (("online_probe", lambda m: (m.get("online_probe") or {}).get(peer)),
                              ("linear_probe", lambda m: ((m.get("linear_probe") or {}).get(peer) or {}).get("top1"))):
                row[key] = _spread_known([pick(m) for m in members])
            rows.append(row)
    return {"study": study.name if study else records[0]["study"], "rows": rows, "baselines": _baselines(folder),
            "published": [dict(p) for p in (study.published if study else ())],
            "val_images": records[0]["val_images"], "bank_images": records[0]["bank_images"],
            "knn_presets": {p: _preset(p) for p in KNN_PRESETS},
            "devices": sorted({_device(r["environment"]) for r in records}),
            "arm_files": [r["_file"] for r in records]}


def _device(env: dict) -> str:
    return env.get("gpu") or f"CPU ({env.get('cpu_count', '?')} cores, {env.get('torch_threads', '?')} threads)"


def _preset(name: str) -> dict:
    from dogo.engine.config import KNN_PROTOCOLS
    k, t = KNN_PROTOCOLS[name]
    return {"k": k, "temperature": t}


def read_baselines(folder: str | Path) -> list[dict]:
    """The baselines files of a study's output folder (baselines_sSEED.json), by seed."""
    import json
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("baselines_s*.json"))]


def _baselines(folder: str | Path) -> list[dict]:
    """Raw pixels and each architecture's random init, mean +- spread over the seeds measured."""
    files = read_baselines(folder)
    if not files:
        return []
    rows = [{"model": "raw pixels", "seeds": [f["seed"] for f in files],
             **{f"knn_{p}": spread([f["raw_pixels"][p] for f in files]) for p in KNN_PRESETS}}]
    inits: dict[str, list[dict]] = {}
    for f in files:
        for b in f["random_init"]:
            inits.setdefault(_init_name(b), []).append({**b, "seed": f["seed"]})
    for name, members in inits.items():
        rows.append({"model": name, "seeds": [m["seed"] for m in members],
                     **{f"knn_{p}": spread([m[p] for m in members]) for p in KNN_PRESETS}})
    return rows


def _init_name(b: dict) -> str:
    return f"{b['arch']}{' (CIFAR stem)' if b.get('cifar_stem') else ''} random init"


def _cell(s: dict | None) -> str:
    if s is None:
        return "-"
    return f"{s['mean']:.2f}" + (f" +- {s['sd']:.2f}" if s["n"] > 1 else "")


def table_markdown(table: dict) -> str:
    """The table as Markdown: one line per arm and peer, then the baselines and the published figures."""
    head = (f"# {table['study']}\n\nkNN top-1 (%) on the val split ({table['val_images']:,} images), the whole "
            f"training split ({table['bank_images']:,} images) as the bank; mean +- sample standard deviation over "
            f"seeds; presets " + ", ".join(f"{p} (k={v['k']}, T={v['temperature']})"
                                           for p, v in table["knn_presets"].items())
            + f". Device: {', '.join(table['devices'])}.\n\n")
    lines = ["| arm | peer | seeds | epochs | batch | images seen | kNN dino | kNN lightly | online probe | "
             "linear probe | device seconds |", "|" + " --- |" * 11]
    for r in table["rows"]:
        kind = "GPU" if r["device_seconds_are"].startswith("GPU") else "CPU wall"
        seconds = "-" if r["device_seconds"] is None else f"{r['device_seconds']['mean']:,.0f} ({kind})"
        lines.append(f"| {r['arm']} | {r['peer']} ({r['arch']}) | {len(r['seeds'])} | {r['epochs']:.3g} | "
                     f"{r['batch_size']} | {r['images_seen']:,} | {_cell(r['knn_dino'])} | {_cell(r['knn_lightly'])} "
                     f"| {_cell(r['online_probe'])} | {_cell(r['linear_probe'])} | "
                     f"{seconds} |")
    for b in table["baselines"]:
        lines.append(f"| {b['model']} | | {len(b.get('seeds', [])) or ''} | | | | {_cell(b['knn_dino'])} | "
                     f"{_cell(b['knn_lightly'])} | | | |")
    text = head + "\n".join(lines) + "\n"
    if table["published"]:
        text += "\nPublished figures for the same settings:\n\n" + "\n".join(
            f"- {p['arm']}: " + ", ".join(f"{k} {v}" for k, v in p.items() if k != "arm") for p in table["published"])
        text += "\n"
    return text


def write_table(folder: str | Path, study: Study | None = None) -> list[Path]:
    """table.json and table.md in the study's output folder, from its arm files (`dogo study` draws
    knn_curves.png beside them: dogo.plots.plot_knn_curves)."""
    folder = Path(folder)
    table = merge(folder, study)
    from dogo.core.io import atomic_write_text
    return [write_json(folder / "table.json", table), atomic_write_text(folder / "table.md", table_markdown(table))]


# ---- command line (`dogo study run|table` wires these in) ---------------------------------------------------------

def run_command(a: argparse.Namespace, log=print) -> int:
    """`run`: the arms, then the table of everything in --out. 0 when every arm asked for has its file, 130 when a
    signal stopped one (the same command resumes it)."""
    study = load_study(a.study)
    done = run_study(study, out=a.out, runs=a.runs, data=a.data, arms=a.arms, seeds=a.seeds, extra=tuple(a.set),
                     force=a.force, log=log)
    wanted = order(study, a.arms or list(study.arms))
    if any(not arm_file(a.out, n, s).is_file() for s in (a.seeds or study.seeds) for n in wanted):
        return 130
    log(f"{len(done)} file(s) written; the table: {', '.join(map(str, write_table(a.out, study)))}")
    return 0


def table_command(a: argparse.Namespace, log=print) -> int:
    log(f"wrote {', '.join(map(str, write_table(a.folder, load_study(a.study) if a.study else None)))}")
    return 0

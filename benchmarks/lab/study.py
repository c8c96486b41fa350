"""Collect training runs into one result file: each run's settings (the keys it changed from a base config), its kNN
monitor curve (step, training seconds, top-1 per peer) and, where given, `dogo eval table` results; groups of runs
(seeds of one setting) get the mean and spread of their final figures.

    python -m dogo.benchmarks.lab.study OUT.json --base configs/cifar10_simclr_r18.yaml --runs RUN [RUN ...] \
        [--tables TABLE.json ...] [--note TEXT]

A run's group is its name without a trailing `_s<seed>`.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import yaml

from dogo.engine import config as config_mod
from dogo.core.environment import environment
from dogo.core.io import write_json


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def run_record(run_dir: Path, base: dict) -> dict:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    flat, flat_base = _flat(cfg), _flat(base)
    changed = {k: v for k, v in flat.items() if flat_base.get(k) != v and not k.startswith(("name", "out_dir"))}
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": e["step"], "epoch": e["epoch"], "train_seconds": e.get("train_seconds"), **e["top1"]}
             for e in events if e.get("event") == "knn"]
    steps = [e for e in events if "event" not in e]
    return {"name": run_dir.name, "settings": changed, "steps": steps[-1]["step"] if steps else 0,
            "final_loss": steps[-1].get("loss") if steps else None, "knn_curve": curve,
            "knn_k": cfg["eval"]["knn_k"], "knn_temperature": cfg["eval"]["knn_temperature"]}


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": values}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--base", required=True, help="the config the runs' settings are read against")
    p.add_argument("--runs", nargs="+", type=Path, required=True)
    p.add_argument("--tables", nargs="*", type=Path, default=[], help="dogo eval table --json outputs")
    p.add_argument("--note", default="")
    a = p.parse_args(argv)
    # through JSON, so the base's tuples compare equal to the lists a run's config.yaml holds
    base = json.loads(json.dumps(config_mod.to_dict(config_mod.load(a.base))))
    runs = [run_record(r, base) for r in a.runs]
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(re.sub(r"_s\d+$", "", r["name"]), []).append(r)
    summary = {}
    for name, members in groups.items():
        finals = [m["knn_curve"][-1] for m in members if m["knn_curve"]]
        peers = [k for k in finals[0] if k not in ("step", "epoch", "train_seconds")] if finals else []
        summary[name] = {peer: summarise([f[peer] for f in finals]) for peer in peers}
    import torch
    write_json(a.out, {"study": a.note, "base_config": a.base, "runs": runs, "final_knn_by_group": summary,
                       "tables": [json.loads(t.read_text()) for t in a.tables],
                       "environment": environment(torch.device("cpu"))})
    print(f"wrote {a.out}: {len(runs)} runs in {len(groups)} groups")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""dogo train: train from a YAML config with key=value overrides (or, with --dry-run, check everything first)."""
from __future__ import annotations

from dogo.commands.args import count, say

HELP = "train from a YAML config with key=value overrides"
DESCRIPTION = (
    "trains; the run folder out_dir/name gets config.yaml (resolved), metrics.jsonl and checkpoints/ (and tb/, see "
    "log.tensorboard). Every key, its default and what it does: docs/config.md; `dogo config CONFIG [overrides]` "
    "prints the resolved config without training. A rerun of the same command resumes from the newest checkpoint; "
    "Ctrl-C (SIGINT) or SIGTERM saves a checkpoint first and exits 130 or 143 (SIGHUP: 129); a finished run exits 0 "
    "and prints a summary with the commands to run next. Without a terminal a line says where the run is at least "
    "every log.heartbeat_s seconds. With --dry-run: checks the config, "
    "opens and counts the data, and estimates one step's memory per rank for N ranks, then exits: 0 when it will "
    "run, 2 with a one-line error naming what to change (make's ImageNet targets run it before torchrun)")


def add(sub) -> None:
    t = sub.add_parser("train", help=HELP, description=DESCRIPTION)
    t.add_argument("config", help="YAML file, e.g. configs/demo.yaml or configs/folder_small.yaml")
    t.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. optim.lr=0.6 peers.r18.tau=0.2 "
                                               "(every key: docs/config.md)")
    t.add_argument("--dry-run", action="store_true",
                   help="check the config and the data and estimate the step's memory per rank, then exit: 0 when "
                        "it will run, 2 with what to change")
    t.add_argument("--world-size", type=count(1), default=1, help="with --dry-run: the ranks the batch is split over")
    t.add_argument("--json", help="with --dry-run: also write the report here")
    t.set_defaults(func=run)


def run(args) -> int:
    from dogo.engine import config as config_mod
    notes: list[str] = []
    cfg = config_mod.load(args.config, args.overrides, notes)
    for note in notes:
        say(f"note: {note}")
    if args.dry_run:
        from dogo.core.io import write_json
        from dogo.engine.run.dry_run import dry_run
        report = dry_run(cfg, args.world_size)
        for line in report["lines"]:
            say(line)
        if args.json:
            write_json(args.json, {k: v for k, v in report.items() if k != "lines"})
        return 0
    from dogo.engine.run.trainer import train
    result = train(cfg)
    return result.get("exit_code", 0)

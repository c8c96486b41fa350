"""dogo study run | table: methods compared under one protocol (benchmarks/study.py trains, evaluates and merges)."""
from __future__ import annotations

from dogo.commands.args import say

HELP = "compare methods under one protocol: train and evaluate a study's arms, merge their files into a table"
RUN = (
    "trains each arm of the study file (a config and overrides per arm, the same budget, batch and seeds for all; "
    "teachers first) unless its file exists, evaluates every arm the same way (kNN with the dino and lightly presets "
    "over the whole training split as the bank, the kNN curve, the online probe where the arm ran one, the standard "
    "linear probe where the study asks) and writes one small JSON per arm and seed with its wall and device seconds, "
    "then DIR/table.json, DIR/table.md and DIR/knn_curves.png. Exit 0 when every arm asked for has its file, 130 when "
    "a signal stopped one (the same command resumes it)")
TABLE = (
    "merges every arm file of a study folder (arms run on other days or machines included) into table.json and "
    "table.md (mean +- spread over seeds per arm and peer, device-seconds, raw pixels and random init beside) and "
    "knn_curves.png (kNN against epochs for every arm)")


def add(sub) -> None:
    s = sub.add_parser("study", help=HELP)
    ssub = s.add_subparsers(dest="kind", required=True)
    r = ssub.add_parser("run", help="train and evaluate a study's arms, then the table", description=RUN)
    r.add_argument("study", help="a study file, e.g. configs/study_cifar10_gpu.yaml")
    r.add_argument("--out", required=True, help="folder for the arm files, the baselines, the table and the plot")
    r.add_argument("--runs", help="folder for the arms' run folders (checkpoints); default OUT/runs")
    r.add_argument("--data", help="data.path of every arm (default: each config's)")
    r.add_argument("--arms", nargs="+", help="only these arms (and the teachers they need, added first)")
    r.add_argument("--seeds", nargs="+", type=int, help="only these seeds (default: the study's)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every arm, after the study's (e.g. device=cpu; repeatable)")
    r.add_argument("--force", action="store_true", help="run arms again whose JSON exists")
    r.set_defaults(func=run)
    t = ssub.add_parser("table", help="merge a study folder's arm files into its table and plot", description=TABLE)
    t.add_argument("folder", help="a study's --out folder")
    t.add_argument("--study", help="the study file, for its name and published figures")
    t.set_defaults(func=table)


def run(args) -> int:
    from dogo.benchmarks.study import run_command
    code = run_command(args, log=say)
    if code == 0:
        _curves(args.out)
    return code


def table(args) -> int:
    from dogo.benchmarks.study import table_command
    code = table_command(args, log=say)
    _curves(args.folder)
    return code


def _curves(folder: str) -> None:
    from pathlib import Path

    from dogo.plots import plot_knn_curves
    say(f"wrote {plot_knn_curves(folder, Path(folder) / 'knn_curves.png')}")

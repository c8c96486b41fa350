"""dogo eval knn | linear | table: evaluate saved runs' backbones (engine/eval/reports.py computes, this prints)."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from dogo.commands.args import console, count, number, say

HELP = "evaluate a checkpoint's backbones"
KNN = (
    "weighted kNN top-1 of every peer's backbone against the same architecture at its random initialisation (the "
    "run's own seed); a progress bar on a terminal while features are extracted; the table goes to RUN/knn.json, "
    "or beside a checkpoint file outside a run folder (CKPT.knn.json), or to --json. Every split is labelled by the "
    "training split's class folders")
LINEAR = (
    "a linear probe on the frozen backbone, top-1 and top-5 on the val split. standard (default; solo-learn's and "
    "lightly's tables): SGD momentum 0.9, lr 0.1 x B/256, cosine, 100 epochs on randomly cropped (scale 0.08-1) and "
    "flipped training images through the backbone in eval mode. fast: AdamW on cached, unaugmented, standardised "
    "features (one feature pass; not comparable with other tools). JSON naming the protocol in "
    "RUN/linear_PEER_PROTOCOL.json")
TABLE = (
    "one table for several runs: every peer's kNN top-1 (the config's eval.knn_protocol) and linear-probe top-1 "
    "(fast by default), next to the same architecture at random initialisation and to raw pixels; the JSON names "
    "both protocols")


def add(sub) -> None:
    from dogo.engine.eval.linear import PROTOCOLS
    e = sub.add_parser("eval", help=HELP)
    esub = e.add_subparsers(dest="kind", required=True)
    k = esub.add_parser("knn", help="weighted kNN top-1 of every peer, against its random initialisation",
                        description=KNN)
    k.add_argument("checkpoint", help="a checkpoint file or a run folder (its newest checkpoint)")
    k.add_argument("overrides", nargs="*", help="config overrides, e.g. data.path=/imagenet eval.knn_protocol=lightly")
    k.add_argument("--json", help="write the table here (default: RUN/knn.json for a run's checkpoint, else "
                                  "CKPT.knn.json beside the file)")
    k.set_defaults(func=knn)

    lin = esub.add_parser("linear", help="linear probe on a frozen backbone: top-1 and top-5", description=LINEAR)
    lin.add_argument("checkpoint", help="a checkpoint file or a run folder (its newest checkpoint)")
    lin.add_argument("--peer", help="which peer's backbone to probe (default: the run's only peer)")
    lin.add_argument("--protocol", choices=PROTOCOLS, default="standard", help="see above [standard]")
    lin.add_argument("--epochs", type=count(1), default=100, help="passes over the training split [100]")
    lin.add_argument("--batch-size", type=count(1), default=256, help="the probe's global batch [256]")
    lin.add_argument("--lr", type=number(0.0), default=None,
                     help="standard: SGD's (default 0.1 x batch/256); fast: AdamW's (default 1e-3)")
    lin.add_argument("--json", help="write the result here (default: RUN/linear_PEER_PROTOCOL.json for a run's "
                                    "checkpoint, else beside the file)")
    lin.add_argument("overrides", nargs="*", help="config overrides, e.g. data.path=/imagenet")
    lin.set_defaults(func=linear)

    tb = esub.add_parser("table", help="kNN and linear probe of runs' peers, their random init and raw pixels",
                         description=TABLE)
    tb.add_argument("runs", nargs="+", help="checkpoint files or run folders (their newest checkpoints)")
    tb.add_argument("--protocol", choices=PROTOCOLS, default="fast",
                    help="the linear probe's (dogo eval linear --help); fast by default: one feature pass per model")
    tb.add_argument("--epochs", type=count(1), default=100, help="linear probe: passes over the training split")
    tb.add_argument("--json", help="write the table here as JSON")
    tb.add_argument("--set", dest="overrides", action="append", default=[],
                    help="a config override for every run, e.g. --set data.path=/cifar (repeatable)")
    tb.set_defaults(func=table)


def context(cfg):
    """The process group (torchrun's, if any) and precision an evaluation of `cfg` runs with."""
    from dogo.core.precision import Precision
    from dogo.engine.dist import distributed
    return distributed.init(cfg.device, cfg.distributed.backend, cfg.distributed.timeout_min), Precision.of(cfg)


def opened(spec: str, overrides: list[str]):
    """(the saved run, the process group, the precision) to evaluate a run folder or checkpoint with."""
    from dogo.engine.eval.saved import SavedRun
    run = SavedRun.open(spec, overrides)
    return (run, *context(run.cfg))


def _write(path: Path, result: dict) -> None:
    from dogo.core.io import write_json
    write_json(path, result)
    say(f"wrote {path}")


def knn(args) -> int:
    from dogo.engine.config import knn_protocol_name
    from dogo.engine.eval.reports import knn_report
    run, ctx, precision = opened(args.checkpoint, args.overrides)
    result = knn_report(run, ctx, precision)
    if not ctx.is_main:
        return 0
    table = Table(title=f"kNN top-1, protocol {knn_protocol_name(run.cfg.eval)}, on {result['data']}, step "
                        f"{run.step}")
    for col in ("peer", "arch", "trained %", "random init %", "gain (points)"):
        table.add_column(col, justify="right" if "%" in col or "gain" in col else "left")
    for name, r in result["peers"].items():
        table.add_row(name, r["arch"], f"{r['trained']:.2f}", f"{r['random_init']:.2f}",
                      f"{r['trained'] - r['random_init']:+.2f}")
    console.print(table)
    _write(Path(args.json) if args.json else run.result_path("knn.json"), result)
    return 0


def linear(args) -> int:
    from dogo.engine.eval.reports import linear_report
    run, ctx, precision = opened(args.checkpoint, args.overrides)
    peer = run.peer_name(args.peer)
    result = linear_report(run, peer, args.protocol, args.epochs, args.batch_size, args.lr, ctx, precision)
    if not ctx.is_main:
        return 0
    if "batch_note" in result:
        say(result["batch_note"])
    scores = ", ".join(f"{k} {result[k]:.2f}%" for k in result if k.startswith("top"))
    say(f"linear probe ({args.protocol} protocol, {args.epochs} epochs, lr {result['lr']:g}) on frozen "
        f"{result['arch']} features of peer '{peer}' ({run.path}): {scores}")
    _write(Path(args.json) if args.json else run.result_path(f"linear_{peer}_{args.protocol}.json"), result)
    return 0


def table(args) -> int:
    from dogo.engine.config import knn_protocol_name
    from dogo.engine.eval.reports import table_report
    from dogo.engine.eval.saved import SavedRun
    runs = [SavedRun.open(spec, args.overrides) for spec in args.runs]
    ctx, precision = context(runs[0].cfg)
    result = table_report(runs, ctx, precision, args.epochs, args.protocol)
    if not ctx.is_main:
        return 0
    view = Table(title=f"top-1 on {result['val_split']} ({result['val_images']} images), kNN "
                       f"{knn_protocol_name(runs[0].cfg.eval)}, linear probe {args.protocol} {args.epochs} epochs")
    for col in ("model", "kNN %", "linear %"):
        view.add_column(col, justify="left" if col == "model" else "right")
    for r in result["rows"]:
        view.add_row(r["model"], f"{r['knn_top1']:.2f}", f"{r['linear_top1']:.2f}")
    console.print(view)
    if args.json:
        _write(Path(args.json), result)
    return 0

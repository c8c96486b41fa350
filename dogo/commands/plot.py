"""dogo plot curves | bench | features: pictures of runs, benchmark results and feature maps (dogo/plots.py draws)."""
from __future__ import annotations

from pathlib import Path

from dogo.commands.args import say
from dogo.plots import MAP_METHODS

HELP = "training curves of runs, charts of benchmark results, or a map of features"
CURVES = (
    "training curves from each run's metrics.jsonl (a run folder or the file itself): one panel per loss term with a "
    "line per peer, the total, learning rates, kNN top-1; several runs overlaid by name (e.g. DoGo R18 vs SimCLR "
    "R18), each run one colour in every panel; default output RUN/curves.png")
BENCH = (
    "charts of dogo bench results: pipeline (images/s per backend with the same run's torchvision and decode-only "
    "bars), loss (time and peak memory against views, log axes, kernel and straightforward), train (images/s per "
    "configuration, median and min-max)")
FEATURES = (
    "a 2-D map of a peer's val-split backbone features (L2-normalised) coloured by class: t-SNE and PCA from "
    "scikit-learn, UMAP from umap-learn (viz extra); RUN/features_PEER_METHOD.png")


def add(sub) -> None:
    pl = sub.add_parser("plot", help=HELP)
    psub = pl.add_subparsers(dest="kind", required=True)
    c = psub.add_parser("curves", help="training curves of runs", description=CURVES)
    c.add_argument("runs", nargs="+", help="run folders or metrics.jsonl files")
    c.add_argument("--out", help="PNG to write (default: the first run folder's curves.png)")
    c.set_defaults(func=curves)
    b = psub.add_parser("bench", help="charts of benchmark result files", description=BENCH)
    b.add_argument("results", nargs="+", help="dogo bench result JSON files, e.g. benchmarks/results/pipeline_*.json")
    b.add_argument("--out", default="bench.png", help="PNG to write [bench.png]")
    b.set_defaults(func=bench)
    f = psub.add_parser("features", help="a 2-D map of a peer's features, coloured by class", description=FEATURES)
    f.add_argument("run", help="a run folder or checkpoint file")
    f.add_argument("--peer", help="which peer (default: the run's only peer)")
    f.add_argument("--method", choices=MAP_METHODS, default="tsne", help="the map [tsne]")
    f.add_argument("--out", help="PNG to write (default: RUN/features_PEER_METHOD.png)")
    f.add_argument("overrides", nargs="*", help="config overrides, e.g. data.path=/cifar")
    f.set_defaults(func=features)


def curves(args) -> int:
    from dogo.plots import plot_runs
    first = Path(args.runs[0])
    say(f"wrote {plot_runs(args.runs, args.out or (first / 'curves.png' if first.is_dir() else 'curves.png'))}")
    return 0


def bench(args) -> int:
    from dogo.plots import plot_bench
    say(f"wrote {plot_bench(args.results, args.out)}")
    return 0


def features(args) -> int:
    from dogo.commands.eval import opened
    from dogo.engine.eval.reports import val_features
    from dogo.plots import embed_2d, plot_feature_map
    run, ctx, precision = opened(args.run, args.overrides)
    peer = run.peer_name(args.peer)
    feats, labels, classes = val_features(run, peer, ctx, precision)
    if not ctx.is_main:
        return 0
    coords = embed_2d(feats.cpu().numpy(), args.method, run.cfg.seed)
    out = Path(args.out) if args.out else run.result_path(f"features_{peer}_{args.method}.png")
    title = (f"{run.cfg.name}/{peer} ({run.cfg.peers[peer].arch}), step {run.step}: {args.method} of "
             f"{len(labels)} {run.cfg.data.val_split} images")
    say(f"wrote {plot_feature_map(coords, labels.cpu().numpy(), classes, title, out)}")
    return 0

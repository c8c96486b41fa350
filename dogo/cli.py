"""The `dogo` command: train, eval, export, convert, bench, plot."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from dogo.engine import config as config_mod
from dogo.engine.environment import device_tag
from dogo.engine.errors import CheckpointError, ConfigError, DataError
from dogo.engine.eval.linear import PROTOCOLS as PROBE_PROTOCOLS
from dogo.engine.io import write_json
from dogo.engine.run import checkpoint
from dogo.models import backbone_spec
from dogo.plots import MAP_METHODS, PlotError
from dogo.pipelines.convert import WRITE_MODES, ConvertOptions, convert, import_ffcv

console = Console()


# What each subcommand does, in full: its --help description (docs/commands.md lists the subcommands)
DESCRIPTIONS = {
    'train': (
        'trains; the run folder out_dir/name gets config.yaml (resolved), metrics.jsonl and checkpoints/ (and '
        "tb/, see log.tensorboard). With --dry-run: checks the config and estimates one step's memory per "
        'rank for N ranks, then exits: 0 when it fits, 2 with a one-line error naming the estimate, what the '
        "device has and the largest data.batch_size that fits (make's ImageNet targets run it before "
        'torchrun)'
    ),
    'eval knn': (
        "weighted kNN top-1 of every peer's backbone against the same architecture at its random "
        "initialisation (the run's own seed); a progress bar on a terminal while features are extracted; the "
        'table goes to RUN/knn.json, or beside a checkpoint file outside a run folder (CKPT.knn.json), or to '
        "--json. Every split is labelled by the training split's class folders"
    ),
    'eval linear': (
        'a linear probe on the frozen backbone, top-1 and top-5 on the val split. standard (default; '
        "solo-learn's and lightly's tables): SGD momentum 0.9, lr 0.1 x B/256, cosine, 100 epochs on randomly "
        'cropped (scale 0.08-1) and flipped training images through the backbone in eval mode. fast: AdamW on '
        'cached, unaugmented, standardised features (one feature pass; not comparable with other tools). JSON '
        'naming the protocol in RUN/linear_PEER_PROTOCOL.json'
    ),
    'eval table': (
        "one table for several runs: every peer's kNN top-1 (the config's eval.knn_protocol) and linear-probe "
        'top-1 (fast by default), next to the same architecture at random initialisation and to raw pixels; '
        'the JSON names both protocols'
    ),
    'convert': (
        "an image-folder split to FFCV's .beton, options with FFCV's meanings; labels are the sorted class "
        "folders (as ImageFolder), or with --labels none every image at any depth, label -1; FFCV's page is "
        "sized to the largest image; files that do not decode (libjpeg's corrupt-data warnings included), "
        'entries that cannot be listed and images beside the class folders are skipped and reported; '
        'DST.classes.json (class names, counts) and DST.report.json (skipped files and why) beside it; '
        'written as DST.partial and renamed when complete, so an interrupted conversion leaves nothing under '
        'DST'
    ),
    'export': (
        "one peer's backbone as a plain state_dict of its library (torchvision, or timm for a timm: peer; a "
        "torchvision ResNet without the CIFAR stem also as timm's ResNet), with the line that loads it; "
        '--head also writes its projection head (with the backbone, a DisCo teacher from files)'
    ),
    'plot': (
        "dogo plot RUN [RUN ...]: training curves from each run's metrics.jsonl (a run folder or the file "
        'itself): one panel per loss term with a line per peer, the total, learning rates, kNN top-1; several '
        'runs overlaid by name (e.g. DoGo R18 vs SimCLR R18); default output RUN/curves.png. dogo plot bench '
        "RESULT.json ...: charts of dogo bench results: pipeline (images/s per backend with the same run's "
        'torchvision and decode-only bars), loss (time and peak memory against views, log axes, kernel and '
        'straightforward), train (images/s per configuration, median and min-max). dogo plot features RUN: a '
        "2-D map of a peer's val-split backbone features (L2-normalised) coloured by class: t-SNE and PCA "
        'from scikit-learn, UMAP from umap-learn (viz extra); RUN/features_PEER_METHOD.png'
    ),
    'bench train': (
        'images/s per device of the training step (warm-up, synchronised timing, repeats, median and spread, '
        "environment), FLOPs per image, achieved TFLOP/s, MFU against the device's peak, aten ops per step, "
        "and on CUDA the host syncs torch's sync debug mode reports (docs/gpu.md)"
    ),
    'bench recipe': (
        "the recipe and the optimiser step alone: the device recipe's bytes moved per image per view (counted "
        "op by op as a GPU runs it) and its time eager and compiled, the CPU-worker recipe's time per image "
        "per view on one core, and the LARS step's time and aten ops for the ImageNet DoGo peers; with the "
        'reference files, the same figures for earlier code in the same run'
    ),
    'bench loss': (
        'time (forward + backward) and peak memory of the contrastive kernel against the straightforward '
        'gather-with-gradient loss, each in a fresh process; where the straightforward version cannot fit it '
        'says so and reports the kernel against its least possible footprint'
    ),
    'bench pipeline': (
        'two-view images/s of the backend (full recipe, where --placement puts it; auto: workers on a CPU, '
        'the device on a GPU) with, in the same run on the same cores, the decode-only ceiling (each image '
        'decoded once, nothing else) and a torchvision DataLoader applying the recipe per image with '
        'transforms.v2, and the ratios, every contender measured in each of --repeats (5) interleaved passes; '
        "for ffcv also FFCV's own read and decode of every image alone (ffcv_decode_only, no crop)"
    ),
}


def _load_run(spec: str, overrides: list[str]):
    """A checkpoint and its run's config, with the overrides applied and the machine's settings (device, precision)
    resolved for this machine rather than the one it was trained on."""
    path = checkpoint.resolve(spec)
    state = checkpoint.load(path)
    checkpoint.check_finite(state, path)
    cfg = config_mod.from_dict(state["config"], overrides, this_machine=True)
    return path, state, cfg


def cmd_train(args) -> int:
    from dogo.engine.run.trainer import train
    cfg = config_mod.load(args.config, args.overrides)
    if args.dry_run:
        return _dry_run(cfg, args.world_size, args.json)
    train(cfg)  # a run stopped by SIGTERM/SIGINT has saved its checkpoint: that is a clean exit too
    return 0


def _dry_run(cfg, world_size: int, json_out: str | None = None) -> int:
    """The config checked and the step's memory estimated for `world_size` ranks, without training."""
    from dogo.engine.dist.distributed import pick_device
    from dogo.engine.precision import Precision
    from dogo.engine.run.memory import check_fits
    device = pick_device(cfg.device)
    precision = Precision.of(cfg)
    est, limit, warning = check_fits(cfg, world_size, device, precision)
    console.print(warning or f"{cfg.name}: the config is valid; a training step needs about "
                  f"{est.total / 2 ** 30:.1f} GiB per rank ({est.describe()}) of {limit / 2 ** 30:.1f} GiB available "
                  f"on this {'GPU' if device.type == 'cuda' else 'CPU'} at {cfg.data.batch_size // world_size} "
                  f"images per rank", highlight=False, soft_wrap=True)
    if json_out:
        from dogo.engine.io import write_json
        write_json(json_out, {
            "estimate": "memory of one training step per rank (dogo.engine.run.memory), before anything runs",
            "config": cfg.name, "world_size": world_size, "batch_per_rank": cfg.data.batch_size // world_size,
            "image_size": cfg.data.image_size, "precision": str(precision.dtype),
            "channels_last": precision.channels_last, "total_gib": est.total / 2 ** 30,
            "parts_gib": {k: v / 2 ** 30 for k, v in est.parts.items()}})
    return 0


def _eval_setup(cfg):
    from dogo.engine.dist import distributed
    from dogo.engine.precision import Precision
    from dogo.engine.ssl.peers import build_peers
    ctx = distributed.init(cfg.device, cfg.distributed.backend, cfg.distributed.timeout_min)
    return ctx, Precision.of(cfg), build_peers


def _result_beside(path: Path, name: str) -> Path:
    """RUN/NAME when the checkpoint lies in a run folder's checkpoints/ (its config.yaml beside them); otherwise
    beside the checkpoint file itself, as CKPT_STEM.NAME: never in some folder that merely holds the file's folder."""
    run = path.parent.parent
    if path.parent.name == "checkpoints" and (run / "config.yaml").is_file():
        return run / name
    return path.with_name(f"{path.stem}.{name}")


def cmd_eval_knn(args) -> int:
    from dogo.engine.eval.evaluate import KnnMonitor
    path, state, cfg = _load_run(args.checkpoint, args.overrides)
    ctx, precision, build_peers = _eval_setup(cfg)
    monitor = KnnMonitor(cfg, ctx, precision)
    trained = build_peers(cfg).to(ctx.device)
    for name, peer in trained.peers.items():
        peer.load_state_dict(state["peers"][name])
    random_init = build_peers(cfg).to(ctx.device)  # the run's own starting weights (same seed)
    table = Table(title=f"kNN top-1, protocol {config_mod.knn_protocol_name(cfg.eval)}, on "
                        f"{Path(cfg.data.path) / cfg.data.val_split}, step {state['position']['step']}")
    for col in ("peer", "arch", "trained %", "random init %", "gain (points)"):
        table.add_column(col, justify="right" if "%" in col or "gain" in col else "left")
    rows = {}
    for name in trained.peers:
        t = monitor.top1(trained.peers[name].backbone)
        r = monitor.top1(random_init.peers[name].backbone)
        rows[name] = {"trained": t, "random_init": r}
        table.add_row(name, cfg.peers[name].arch, f"{t:.2f}", f"{r:.2f}", f"{t - r:+.2f}")
    if ctx.is_main:
        console.print(table)
        from dogo.engine.environment import environment
        from dogo.engine.io import write_json
        out = Path(args.json) if args.json else _result_beside(path, "knn.json")
        write_json(out, {
            "evaluation": "knn_top1_vs_random_init", "checkpoint": str(path), "step": state["position"]["step"],
            "config": cfg.name, "data": str(Path(cfg.data.path) / cfg.data.val_split),
            "knn_protocol": cfg.eval.knn_protocol, "k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature,
            "peers": {n: {"arch": cfg.peers[n].arch, **r} for n, r in rows.items()},
            "environment": environment(ctx.device)})
        console.print(f"wrote {out}", highlight=False)
    return 0


def cmd_eval_linear(args) -> int:
    from dogo.engine.environment import environment
    from dogo.engine.eval.evaluate import extract_features
    from dogo.engine.eval.linear import fast_probe, standard_probe
    from dogo.pipelines import open_eval_split
    path, state, cfg = _load_run(args.checkpoint, args.overrides)
    if args.peer not in state["peers"]:
        raise ConfigError(f"--peer {args.peer!r}: the checkpoint has peers {', '.join(state['peers'])}")
    ctx, precision, build_peers = _eval_setup(cfg)
    model = build_peers(cfg).to(ctx.device)
    model.peers[args.peer].load_state_dict(state["peers"][args.peer])
    backbone = model.peers[args.peer].backbone
    splits = {name: open_eval_split(cfg.data, name, cfg.data.workers)
              for name in (cfg.data.train_split, cfg.data.val_split)}
    train, val = splits[cfg.data.train_split], splits[cfg.data.val_split]
    if args.protocol == "standard":
        result = standard_probe(backbone, train, val, recipe=cfg.augment, ctx=ctx, precision=precision,
                                epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=cfg.seed)
    else:
        feats = {name: extract_features(backbone, split, np.arange(len(split)), batch_size=cfg.eval.batch_size,
                                        recipe=cfg.augment, ctx=ctx, precision=precision)
                 for name, split in splits.items()}
        result = fast_probe(*feats[cfg.data.train_split], *feats[cfg.data.val_split], len(train.classes),
                            epochs=args.epochs, lr=args.lr or 1e-3, batch_size=args.batch_size, seed=cfg.seed)
    if ctx.is_main:
        console.print(f"linear probe ({args.protocol} protocol, {args.epochs} epochs) on frozen "
                      f"{cfg.peers[args.peer].arch} features of peer '{args.peer}' ({path}): "
                      + ", ".join(f"{k} {v:.2f}%" for k, v in result.items()), highlight=False)
        out = Path(args.json) if args.json else _result_beside(path, f"linear_{args.peer}_{args.protocol}.json")
        write_json(out, {
            "evaluation": "linear_probe", "protocol": args.protocol, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "checkpoint": str(path), "step": state["position"]["step"],
            "config": cfg.name, "peer": args.peer, "arch": cfg.peers[args.peer].arch,
            "data": str(Path(cfg.data.path)), "train_split": cfg.data.train_split, "val_split": cfg.data.val_split,
            **result, "environment": environment(ctx.device)})
        console.print(f"wrote {out}", highlight=False)
    return 0


def cmd_eval_table(args) -> int:
    """kNN and linear-probe top-1 of every peer of every run, of the same networks at their random
    initialisation, and of raw pixels, on the first run's evaluation splits; one JSON file."""
    from dogo.engine.environment import environment
    from dogo.engine.eval.table import comparison_rows
    runs = [_load_run(spec, args.overrides) for spec in args.runs]
    first = runs[0][2]
    ctx, precision, _ = _eval_setup(first)
    rows, val_images = comparison_rows(runs, ctx, precision, args.epochs, args.protocol)
    ev = first.eval
    if ctx.is_main:
        table = Table(title=f"top-1 on {first.data.val_split} ({val_images} images), kNN "
                            f"{config_mod.knn_protocol_name(ev)}, linear probe {args.protocol} {args.epochs} epochs")
        for col in ("model", "kNN %", "linear %"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in rows:
            table.add_row(r["model"], f"{r['knn_top1']:.2f}", f"{r['linear_top1']:.2f}")
        console.print(table)
        if args.json:
            write_json(args.json, {
                "evaluation": "knn_and_linear_probe_top1", "data": first.data.path,
                "train_split": first.data.train_split, "val_split": first.data.val_split,
                "knn_protocol": ev.knn_protocol, "k": ev.knn_k, "temperature": ev.knn_temperature,
                "linear_protocol": args.protocol, "probe_epochs": args.epochs, "rows": rows,
                "environment": environment(ctx.device)})
            console.print(f"wrote {args.json}", highlight=False)
    return 0


def cmd_export(args) -> int:
    from dogo.engine.io import atomic_write
    path, state, cfg = _load_run(args.checkpoint, [])
    if args.peer not in state["peers"]:
        raise ConfigError(f"--peer {args.peer!r}: the checkpoint has peers {', '.join(state['peers'])}")
    peer = cfg.peers[args.peer]
    backbone = backbone_spec(peer.arch, f"peers.{args.peer}.arch")
    library = args.format or backbone.library
    if library == "timm" and backbone.library != "timm" and (backbone.timm_name is None or peer.cifar_stem):
        raise ConfigError(f"--format timm: the {peer.arch} backbone of peer '{args.peer}' has no timm model with its "
                          f"keys" + (" (its CIFAR stem is not timm's)" if peer.cifar_stem else "")
                          + "; export it as --format torchvision")
    if library == "torchvision" and backbone.library == "timm":
        raise ConfigError(f"--format torchvision: peer '{args.peer}' is a timm model ({peer.arch}); use --format timm")
    prefix = "backbone."
    weights = {k[len(prefix):]: v for k, v in state["peers"][args.peer].items() if k.startswith(prefix)}
    atomic_write(args.out, lambda tmp: torch.save(weights, tmp))
    if args.head:
        head = {k[len("head."):]: v for k, v in state["peers"][args.peer].items() if k.startswith("head.")}
        atomic_write(args.head, lambda tmp: torch.save(head, tmp))
        console.print(f"wrote {args.head}: the projection head of peer '{args.peer}' ({len(head)} tensors)",
                      highlight=False)
    hint = backbone.export_hint(args.out, cfg.data.image_size, peer.arch_args, library)
    console.print(f"wrote {args.out}: the {peer.arch} backbone of peer '{args.peer}' ({len(weights)} tensors)\n"
                  f"load it with {library}:  {hint}", highlight=False)
    if peer.cifar_stem:
        console.print("this backbone was trained with cifar_stem: first rebuild the stem with "
                      "dogo.models.build_backbone('" + peer.arch + "', cifar_stem=True)", highlight=False)
    return 0


def cmd_bench_train(args) -> int:
    from dogo.benchmarks.train_step import bench_train
    from dogo.engine.dist import distributed
    cfg = config_mod.load(args.config, args.overrides)
    result = bench_train(cfg, args.warmup, args.steps, args.repeats, args.peak_tflops)
    if distributed.rank() == 0:
        env = result["environment"]
        out = Path(args.json or f"benchmarks/results/train_{cfg.name}_{result['image_size']}px_{device_tag(env)}.json")
        write_json(out, result)
        w, e, c = (result[k] for k in ("step_with_batch_and_augmentation", "engine_only", "plain_model_ceiling"))
        ratios = result["ratios"]
        mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (no known peak: --peak-tflops)"
        console.print(f"{cfg.name} on {env['gpu'] or 'CPU'}: {w['images_per_s_median']:.1f} images/s per device "
                      f"(whole step; {e['images_per_s_median']:.1f} engine only; {c['images_per_s_median']:.1f} "
                      f"plain-model ceiling; whole/engine {ratios['whole_to_engine']:.3f}, whole/ceiling "
                      f"{ratios['whole_to_ceiling']:.3f}, engine/ceiling {ratios['engine_to_ceiling']:.3f}); "
                      f"{result['flops_per_image'] / 1e9:.2f} GFLOP per image, {result['tflops']:.3f} TFLOP/s, "
                      f"MFU {mfu}, {result['ops_per_step']} ops per step; memory estimate "
                      f"{result['memory']['estimate_bytes'] / 2 ** 30:.2f} GiB, measured "
                      f"{result['memory']['measured_peak_bytes'] / 2 ** 30:.2f} GiB"
                  + (f"; {result['ratio_to_synthetic_ceiling']:.2f}x the synthetic-data ceiling of "
                     f"{result['synthetic_ceiling']['images_per_s_median']:.1f} images/s"
                     if "synthetic_ceiling" in result else "") + f"; wrote {out}", highlight=False)
    distributed.shutdown()
    return 0


def cmd_bench_loss(args) -> int:
    from dogo.benchmarks.loss import bench_loss
    from dogo.engine.dist.distributed import pick_device
    device = str(pick_device(config_mod.resolve_device(args.device)))
    result = bench_loss(args.views, args.dim, args.tile, args.objective, args.dtype, device, args.repeats,
                        args.max_seconds, log=lambda msg: console.print(msg, highlight=False))
    env = result["environment"]
    out = Path(args.json or f"benchmarks/results/loss_{args.objective}_{device_tag(env)}.json")
    write_json(out, result)
    table = Table(title=f"contrastive loss ({args.objective}, d={args.dim}, tile {args.tile}) on {env['gpu'] or 'CPU'}")
    for col in ("views", "kernel s", "kernel peak", "straightforward s", "straightforward peak", "memory", "time"):
        table.add_column(col, justify="right")
    gib = lambda x: f"{x / 2**30:.3f} GiB"
    for r in result["results"]:
        k, s = r["kernel"], r["straightforward"]
        table.add_row(str(r["views"]), f"{k['seconds_median']:.3f}" if "seconds_median" in k else k.get("failed", "-"),
                      gib(k["peak_bytes"]) if "peak_bytes" in k else "-",
                      f"{s['seconds_median']:.3f}" if "seconds_median" in s else "would not fit",
                      gib(s["peak_bytes"]) if "peak_bytes" in s else f">= {gib(r['straightforward_lower_bound_bytes'])}",
                      f"{r['memory_ratio']:.4f}" if "memory_ratio" in r else
                      (f"<= {r['memory_ratio_vs_lower_bound']:.4f}" if "memory_ratio_vs_lower_bound" in r else "-"),
                      f"{r['time_ratio']:.2f}x" if "time_ratio" in r else "-")
    console.print(table)
    console.print(f"goal: {result['goal']}; wrote {out}", highlight=False)
    return 0


def cmd_bench_pipeline(args) -> int:
    import os
    from dogo.benchmarks.pipeline import bench_pipeline
    from dogo.engine.dist.distributed import pick_device
    if args.backend == "ffcv" and not args.beton:
        raise ConfigError("--backend ffcv needs --beton: the --data split converted with `dogo convert`")
    device = pick_device(config_mod.resolve_device(args.device))
    workers = args.workers or os.cpu_count()
    if args.backend == "cifar":
        from dogo.benchmarks.pipeline import bench_cifar
        size = args.size or 32
        result = bench_cifar(Path(args.data), size, args.batch, args.batches, args.warmup, args.repeats, workers,
                             device, log=lambda m: console.print(m, highlight=False))
        out = Path(args.json or f"benchmarks/results/pipeline_cifar_{device_tag(result['environment'])}.json")
        write_json(out, result)
        console.print(f"cifar: {result['backend_two_views']['images_per_s']:.1f} images/s (two views at {size} px) "
                      f"= {result['ratio_to_folder']:.1f}x the folder backend, {result['ratio_to_torchvision']:.1f}x "
                      f"torchvision; wrote {out}", highlight=False)
        return 0
    result = bench_pipeline(args.backend, Path(args.data), args.beton, args.size or 224, args.batch, args.batches,
                            args.warmup, args.repeats, workers, device, args.placement,
                            log=lambda m: console.print(m, highlight=False))
    tag = f"{args.backend}_{result['placement']}" if args.backend in ("folder", "ffcv") else args.backend
    out = Path(args.json or f"benchmarks/results/pipeline_{tag}_{device_tag(result['environment'])}.json")
    write_json(out, result)
    console.print(f"{args.backend} ({result['placement']}): {result['backend_two_views']['images_per_s']:.1f} "
                  f"images/s (two views at "
                  f"{args.size or 224} px) = {result['ratio_to_torchvision']:.2f}x torchvision, "
                  f"{result['ratio_to_decode_ceiling']:.2f}x the decode-only ceiling; goal met: {result['goal_met']}; "
                  f"wrote {out}", highlight=False)
    return 0


def cmd_bench_recipe(args) -> int:
    from dogo.benchmarks.recipe import bench_recipe
    from dogo.engine.dist.distributed import pick_device
    result = bench_recipe(args.size, args.batch, args.repeats, args.compile, args.reference, args.reference_optim,
                          pick_device(config_mod.resolve_device(args.device)), log=lambda m: console.print(m, highlight=False))
    out = Path(args.json or f"benchmarks/results/recipe_{args.size}px_{device_tag(result['environment'])}.json")
    write_json(out, result)
    console.print(f"wrote {out}", highlight=False)
    return 0


def cmd_convert(args) -> int:
    try:
        import_ffcv()
    except ImportError as exc:
        raise DataError(f"dogo convert needs FFCV ({exc}); install it with `pip install dogo[ffcv]` after its system "
                        "packages (apt-get install libturbojpeg0-dev libopencv-dev pkg-config), or run make setup") from None
    options = ConvertOptions(max_resolution=args.max_resolution, write_mode=args.write_mode,
                             jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
                             smart_threshold=args.smart_threshold, num_workers=args.num_workers,
                             chunk_size=args.chunk_size, strict=args.strict, labels=args.labels)
    try:
        convert(args.src, args.dst, options, overwrite=args.overwrite,
                log=lambda msg: console.print(msg, highlight=False))
    except KeyboardInterrupt:
        console.print(f"interrupted: nothing was written to {args.dst}", highlight=False, soft_wrap=True)
        return 130
    return 0


def cmd_plot_features(args) -> int:
    """A 2-D map (t-SNE, UMAP or PCA) of one peer's backbone features of the val split, coloured by class."""
    from dogo.engine.eval.evaluate import extract_features
    from dogo.pipelines import open_eval_split
    from dogo.plots import embed_2d, plot_feature_map
    if len(args.inputs) != 2:
        raise ConfigError("dogo plot features takes one run: dogo plot features RUN [--peer NAME] [--method tsne]")
    path, state, cfg = _load_run(args.inputs[1], args.overrides)
    peer = args.peer or next(iter(state["peers"]))
    if peer not in state["peers"]:
        raise ConfigError(f"--peer {peer!r}: the checkpoint has peers {', '.join(state['peers'])}")
    ctx, precision, build_peers = _eval_setup(cfg)
    model = build_peers(cfg).to(ctx.device)
    model.peers[peer].load_state_dict(state["peers"][peer])
    split = open_eval_split(cfg.data, cfg.data.val_split, cfg.data.workers)
    features, labels = extract_features(model.peers[peer].backbone, split, np.arange(len(split)),
                                        batch_size=cfg.eval.batch_size, recipe=cfg.augment, ctx=ctx,
                                        precision=precision)
    if not ctx.is_main:
        return 0
    coords = embed_2d(features.cpu().numpy(), args.method, cfg.seed)
    out = Path(args.out) if args.out else _result_beside(path, f"features_{peer}_{args.method}.png")
    title = (f"{cfg.name}/{peer} ({cfg.peers[peer].arch}), step {state['position']['step']}: {args.method} of "
             f"{len(labels)} {cfg.data.val_split} images")
    plot_feature_map(coords, labels.cpu().numpy(), split.classes, title, out)
    console.print(f"wrote {out}", highlight=False)
    return 0


def cmd_plot(args) -> int:
    from dogo.plots import plot_bench, plot_runs
    if args.inputs[0] == "features":
        return cmd_plot_features(args)
    if args.inputs[0] == "bench":
        if len(args.inputs) == 1:
            raise ConfigError("dogo plot bench needs result files, e.g. benchmarks/results/pipeline_*_cpu2.json")
        out = plot_bench(args.inputs[1:], args.out or "bench.png")
    else:
        first = Path(args.inputs[0])
        out = plot_runs(args.inputs, args.out or (first / "curves.png" if first.is_dir() else "curves.png"))
    console.print(f"wrote {out}", highlight=False)
    return 0


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train from a YAML config with key=value overrides",
                       description=DESCRIPTIONS["train"])
    t.add_argument("config", help="YAML file, e.g. configs/demo.yaml")
    t.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. optim.lr=0.6 peers.r18.tau=0.2")
    t.add_argument("--dry-run", action="store_true",
                   help="check the config and estimate the step's memory per rank, then exit: 0 when it fits, "
                        "2 with the batch size that would (make's ImageNet targets run it before torchrun)")
    t.add_argument("--world-size", type=int, default=1, help="with --dry-run: the ranks the batch is split over")
    t.add_argument("--json", help="with --dry-run: also write the estimate here")
    t.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a checkpoint's backbones")
    esub = e.add_subparsers(dest="kind", required=True)
    k = esub.add_parser("knn", help="weighted kNN top-1 of every peer, against its random initialisation",
                        description=DESCRIPTIONS["eval knn"])
    k.add_argument("checkpoint", help="a checkpoint file or a run folder (its newest checkpoint)")
    k.add_argument("overrides", nargs="*", help="config overrides, e.g. data.path=/imagenet eval.knn_k=200")
    k.add_argument("--json", help="write the table here (default: RUN/knn.json for a run's checkpoint, else "
                                  "CKPT.knn.json beside the file)")
    k.set_defaults(func=cmd_eval_knn)
    lin = esub.add_parser("linear", help="linear probe on a frozen backbone: top-1 and top-5",
                          description=DESCRIPTIONS["eval linear"])
    lin.add_argument("checkpoint", help="a checkpoint file or a run folder (its newest checkpoint)")
    lin.add_argument("--peer", required=True, help="which peer's backbone to probe")
    lin.add_argument("--protocol", choices=PROBE_PROTOCOLS, default="standard", help="see above [standard]")
    lin.add_argument("--epochs", type=int, default=100, help="passes over the training split")
    lin.add_argument("--batch-size", type=int, default=256, help="the probe's global batch")
    lin.add_argument("--lr", type=float, default=None,
                     help="standard: SGD's (default 0.1 x batch/256); fast: AdamW's (default 1e-3)")
    lin.add_argument("--json", help="write the result here (default: RUN/linear_PEER_PROTOCOL.json for a run's "
                                    "checkpoint, else beside the file)")
    lin.add_argument("overrides", nargs="*", help="config overrides, e.g. data.path=/imagenet")
    lin.set_defaults(func=cmd_eval_linear)

    tb = esub.add_parser("table", help="kNN and linear probe of runs' peers, their random init and raw pixels",
                         description=DESCRIPTIONS["eval table"])
    tb.add_argument("runs", nargs="+", help="checkpoint files or run folders (their newest checkpoints)")
    tb.add_argument("--protocol", choices=PROBE_PROTOCOLS, default="fast",
                    help="the linear probe's (dogo eval linear --help); fast by default: one feature pass per model")
    tb.add_argument("--epochs", type=int, default=100, help="linear probe: passes over the training split")
    tb.add_argument("--json", help="write the table here as JSON")
    tb.add_argument("--set", dest="overrides", action="append", default=[],
                    help="a config override for every run, e.g. --set data.path=/cifar (repeatable)")
    tb.set_defaults(func=cmd_eval_table)


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="write one peer's backbone as a plain torchvision or timm state_dict",
                       description=DESCRIPTIONS["export"])
    x.add_argument("checkpoint", help="a checkpoint file or a run folder (its newest checkpoint)")
    x.add_argument("--peer", required=True, help="which peer to export")
    x.add_argument("out", help="output .pt file")
    x.add_argument("--head", metavar="OUT", help="also write the peer's projection head's state_dict here "
                   "(with the backbone, a DisCo teacher: teacher.backbone=... teacher.head=...)")
    x.add_argument("--format", choices=["torchvision", "timm"],
                   help="the library the state_dict loads into (default: the backbone's own; a torchvision ResNet "
                        "without the CIFAR stem also loads into timm's ResNet of the same name)")
    x.set_defaults(func=cmd_export)


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="an image-folder split to FFCV's .beton (classes and report beside it)",
                       description=DESCRIPTIONS["convert"])
    c.add_argument("src", help="image-folder split: SRC/<class_name>/<image>, e.g. /imagenet/train")
    c.add_argument("dst", help="output file, e.g. /data/imagenet_train.beton")
    c.add_argument("--max-resolution", type=int, help="longer side at most this many pixels (default: keep)")
    c.add_argument("--write-mode", choices=WRITE_MODES, default=ConvertOptions.write_mode,
                   help="FFCV's: raw pixels, JPEG, a --compress-probability share as JPEG, or smart [raw]")
    c.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of stored JPEGs [90]")
    c.add_argument("--compress-probability", type=float, default=0.5, help="write-mode proportion: share as JPEG [0.5]")
    c.add_argument("--smart-threshold", type=int, help="write-mode smart: images above this many raw bytes as JPEG")
    c.add_argument("--num-workers", type=int, default=0, help="processes (0: one per core)")
    c.add_argument("--chunk-size", type=int, default=100, help="images per unit of work of a writer process [100]")
    c.add_argument("--strict", action="store_true", help="the first bad file is an error (default: skip and report)")
    c.add_argument("--labels", choices=("folders", "none"), default="folders",
                   help="folders: SRC/<class_name>/<image>; none: every image under SRC at any depth, unlabelled "
                        "(label -1; train with data.labels=none) [folders]")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output")
    c.set_defaults(func=cmd_convert)


def _add_plot(sub) -> None:
    pl = sub.add_parser("plot", help="training curves of runs, charts of benchmark results, or a map of features",
                        description=DESCRIPTIONS["plot"])
    pl.add_argument("inputs", nargs="+", metavar="RUN | bench RESULT.json | features RUN",
                    help="run folders or metrics.jsonl files; the word bench and result JSON files; or the word "
                         "features and one run folder or checkpoint")
    pl.add_argument("--out", help="PNG to write (default: the first run folder's curves.png, bench.png, or "
                                  "RUN/features_PEER_METHOD.png)")
    pl.add_argument("--peer", help="features: which peer (default: the first)")
    pl.add_argument("--method", choices=MAP_METHODS, default="tsne", help="features: the map [tsne]")
    pl.add_argument("--set", dest="overrides", action="append", default=[],
                    help="features: a config override, e.g. --set data.path=/cifar (repeatable)")
    pl.set_defaults(func=cmd_plot)


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="throughput benchmarks that write JSON into benchmarks/results/")
    bsub = b.add_subparsers(dest="kind", required=True)
    bt = bsub.add_parser("train", help="training-step images/s per device on synthetic batches",
                         description=DESCRIPTIONS["bench train"])
    bt.add_argument("config", help="YAML config, e.g. configs/bench_r18_r50.yaml")
    bt.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. data.image_size=64")
    bt.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, cuDNN autotuning)")
    bt.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    bt.add_argument("--repeats", type=int, default=3, help="timed repeats; the JSON keeps each and the median")
    bt.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense peak (TFLOP/s) for the MFU; default: bf16 dense peak of known GPUs by "
                         "name (H100 989, A100 312, ...); none on CPUs")
    bt.add_argument("--json", help="output file (default: benchmarks/results/train_<name>_<size>px_<device>.json)")
    bt.set_defaults(func=cmd_bench_train)
    bl = bsub.add_parser("loss", help="time and peak memory of the contrastive kernel vs the straightforward loss",
                         description=DESCRIPTIONS["bench loss"])
    bl.add_argument("--views", type=int, nargs="+", default=[4096, 16384, 65536], help="2N, both views counted")
    bl.add_argument("--dim", type=int, default=128, help="embedding size d")
    bl.add_argument("--tile", type=lambda v: v if v == "auto" else int(v), default="auto",
                    help="kernel tile, in images, or auto as objective.tile resolves it on the device [auto]")
    bl.add_argument("--objective", choices=["dogo", "simclr"], default="dogo",
                    help="dogo: two peers' NT-Xent and both KL terms; simclr: one peer's NT-Xent")
    bl.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="embeddings' dtype")
    bl.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    bl.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median kept) ...")
    bl.add_argument("--max-seconds", type=float, default=60.0, help="... unless they have taken this long already")
    bl.add_argument("--json", help="output file (default: benchmarks/results/loss_<objective>_<device>.json)")
    bl.set_defaults(func=cmd_bench_loss)
    br = bsub.add_parser("recipe", help="the recipe (bytes moved, time; device and CPU-worker) and the LARS step alone",
                         description=DESCRIPTIONS["bench recipe"])
    br.add_argument("--size", type=int, default=224, help="view side, px")
    br.add_argument("--batch", type=int, default=64, help="images per view batch")
    br.add_argument("--repeats", type=int, default=5)
    br.add_argument("--compile", action="store_true", help="also time precision.compile=on (compiles first)")
    br.add_argument("--reference", help="an earlier pipelines/recipe/device.py (with BatchAugment) to measure beside")
    br.add_argument("--reference-optim", help="an earlier engine/run/optim.py to time its LARS step beside")
    br.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    br.add_argument("--json", help="output file (default: benchmarks/results/recipe_<size>px_<device>.json)")
    br.set_defaults(func=cmd_bench_recipe)
    bp = bsub.add_parser("pipeline", help="two-view images/s of a backend vs the decode-only ceiling and torchvision",
                         description=DESCRIPTIONS["bench pipeline"])
    bp.add_argument("--backend", choices=["folder", "ffcv", "dali", "cifar"], required=True,
                    help="cifar: --data is a CIFAR python folder; the views are 32 px unless --size says otherwise")
    bp.add_argument("--data", default="data/photos500/train",
                    help="image-folder split (make photos writes 500x375 photo JPEGs to data/photos500)")
    bp.add_argument("--beton", default="", help="--backend ffcv: the same split as a .beton (dogo convert)")
    bp.add_argument("--size", type=int, help="view side, px (default 224; 32 with --backend cifar)")
    bp.add_argument("--batch", type=int, default=64)
    bp.add_argument("--batches", type=int, default=16, help="timed batches per repeat")
    bp.add_argument("--warmup", type=int, default=4, help="untimed batches first (every worker started)")
    bp.add_argument("--repeats", type=int, default=5, help="interleaved passes over every contender")
    bp.add_argument("--workers", type=int, default=0, help="decoding processes or threads (0: one per core)")
    bp.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    bp.add_argument("--placement", choices=["auto", "device", "workers"], default="auto",
                    help="folder and ffcv: where the recipe after the crop runs (augment.place); auto: device on a "
                         "GPU, workers on a CPU")
    bp.add_argument("--json", help="output file (default: benchmarks/results/pipeline_<backend>[_<placement>]_"
                                   "<device>.json)")
    bp.set_defaults(func=cmd_bench_pipeline)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dogo", description="Self-supervised distillation trainer (DoGo, SimCLR).")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_eval, _add_export, _add_convert, _add_plot, _add_bench):
        add(sub)
    return p


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: the file, what went wrong, and what to do."""
    import errno
    where = exc.filename if exc.filename is not None else "a file"
    what = exc.strerror or str(exc)
    advice = {
        errno.ENOSPC: "the disk is full: free space, then run the same command again (a training run resumes from "
                      "its newest checkpoint)",
        errno.EFBIG: "the file is over a size limit (ulimit -f): raise it or write elsewhere",
        errno.EDQUOT: "the disk quota is used up: free space, then run the same command again",
        errno.EACCES: "it cannot be written here: choose another path (out_dir=..., or another destination)",
        errno.EROFS: "the file system is read-only: choose another path (out_dir=..., or another destination)",
        errno.ENOTDIR: "a file stands where a folder is needed: choose another path (out_dir=...)",
        errno.EEXIST: "a file stands where a folder is needed: choose another path (out_dir=...)",
        errno.EISDIR: "a folder stands where a file is needed: give a file name",
    }.get(exc.errno, "check the path and the disk")
    return f"{where}: {what}; {advice}"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    warnings.filterwarnings("once", category=UserWarning)
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, PlotError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)  # one line, however long
        return 2
    except OSError as exc:  # a full disk, a path that is a file, a folder that cannot be written: the file and why
        console.print(f"[bold red]error:[/] {os_error_line(exc)}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a command's own handling (e.g. while numba compiles at import)
        console.print("interrupted", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())

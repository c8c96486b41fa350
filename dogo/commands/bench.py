"""dogo bench train | loss | recipe | pipeline: the throughput benchmarks (benchmarks/), each writing a JSON result
into benchmarks/results/ (named after the device unless --json says otherwise)."""
from __future__ import annotations

import os
from pathlib import Path

from rich.table import Table

from dogo.commands.args import console, count, number, say

HELP = "throughput benchmarks that write JSON into benchmarks/results/"
TRAIN = (
    "images/s per device of the training step (warm-up, synchronised timing, repeats, median and spread, "
    "environment), FLOPs per image, achieved TFLOP/s, MFU against the device's peak, launches per step (aten ops "
    "and CUDA graph replays), and on CUDA the host syncs torch's sync debug mode reports; with "
    "precision.cuda_graphs=on also the same step eager, for the comparison (docs/gpu.md)")
RECIPE = (
    "the recipe and the optimiser step alone: the device recipe's bytes moved per image per view (counted op by op "
    "as a GPU runs it) and its time eager and compiled, the CPU-worker recipe's time per image per view on one "
    "core, and the LARS step's time and aten ops for the ImageNet DoGo peers; with the reference files, the same "
    "figures for earlier code in the same run")
LOSS = (
    "time (forward + backward) and peak memory of the contrastive kernel against the straightforward "
    "gather-with-gradient loss, each in a fresh process; where the straightforward version cannot fit it says so "
    "and reports the kernel against its least possible footprint")
PIPELINE = (
    "two-view images/s of the backend (full recipe, where --placement puts it; auto: workers on a CPU, the device on "
    "a GPU) with, in the same run on the same cores, the decode-only ceiling (each image decoded once, nothing else) "
    "and a torchvision DataLoader applying the recipe per image with transforms.v2, and the ratios, every contender "
    "measured in each of --repeats (5) interleaved passes; for ffcv also FFCV's own read and decode of every image "
    "alone (ffcv_decode_only, no crop)")
DEVICES = ["auto", "cpu", "cuda"]


def add(sub) -> None:
    b = sub.add_parser("bench", help=HELP)
    bsub = b.add_subparsers(dest="kind", required=True)
    bt = bsub.add_parser("train", help="training-step images/s per device on synthetic batches", description=TRAIN)
    bt.add_argument("config", help="YAML config, e.g. configs/bench_r18_r50.yaml")
    bt.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. data.image_size=64")
    bt.add_argument("--warmup", type=count(0), default=3, help="untimed steps first (allocator, cuDNN autotuning)")
    bt.add_argument("--steps", type=count(1), default=10, help="steps per timed repeat")
    bt.add_argument("--repeats", type=count(1), default=3, help="timed repeats; the JSON keeps each and the median")
    bt.add_argument("--peak-tflops", type=number(0.0), default=None,
                    help="the device's dense peak (TFLOP/s) for the MFU; default: bf16 dense peak of known GPUs by "
                         "name (H100 989, A100 312, ...); none on CPUs")
    bt.add_argument("--json", help="output file (default: benchmarks/results/train_<name>_<size>px_<device>.json)")
    bt.set_defaults(func=train)

    bl = bsub.add_parser("loss", help="time and peak memory of the contrastive kernel vs the straightforward loss",
                         description=LOSS)
    bl.add_argument("--views", type=count(2), nargs="+", default=[4096, 16384, 65536],
                    help="2N, both views counted (even)")
    bl.add_argument("--dim", type=count(1), default=128, help="embedding size d")
    bl.add_argument("--tile", type=_tile, default="auto",
                    help="kernel tile, in images, or auto as objective.tile resolves it on the device [auto]")
    bl.add_argument("--objective", choices=["dogo", "simclr"], default="dogo",
                    help="dogo: two peers' NT-Xent and both KL terms; simclr: one peer's NT-Xent")
    bl.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="embeddings' dtype")
    bl.add_argument("--device", choices=DEVICES, default="auto")
    bl.add_argument("--repeats", type=count(1), default=3, help="timed runs per measurement (median kept) ...")
    bl.add_argument("--max-seconds", type=number(0.0), default=60.0, help="... unless they have taken this long already")
    bl.add_argument("--json", help="output file (default: benchmarks/results/loss_<objective>_<device>.json)")
    bl.set_defaults(func=loss)

    br = bsub.add_parser("recipe", help="the recipe (bytes moved, time; device and CPU-worker) and the LARS step alone",
                         description=RECIPE)
    br.add_argument("--size", type=count(8), default=224, help="view side, px")
    br.add_argument("--batch", type=count(1), default=64, help="images per view batch")
    br.add_argument("--repeats", type=count(1), default=5)
    br.add_argument("--compile", action="store_true", help="also time precision.compile=on (compiles first)")
    br.add_argument("--reference", help="an earlier device recipe with BatchAugment to measure beside, e.g. from `git show "
                         "f5eabc4:pipelines/augment.py` (benchmarks/recipe.py)")
    br.add_argument("--reference-optim", help="an earlier optimiser module to time its LARS step beside, e.g. from `git show "
                         "f5eabc4:engine/optim.py`")
    br.add_argument("--device", choices=DEVICES, default="auto")
    br.add_argument("--json", help="output file (default: benchmarks/results/recipe_<size>px_<device>.json)")
    br.set_defaults(func=recipe)

    bp = bsub.add_parser("pipeline", help="two-view images/s of a backend vs the decode-only ceiling and torchvision",
                         description=PIPELINE)
    bp.add_argument("--backend", choices=["folder", "ffcv", "dali", "cifar"], required=True,
                    help="cifar: --data is a CIFAR python folder; the views are 32 px unless --size says otherwise")
    bp.add_argument("--data", default="data/photos500/train",
                    help="image-folder split (make photos writes 500x375 photo JPEGs to data/photos500)")
    bp.add_argument("--beton", default="", help="--backend ffcv: the same split as a .beton (dogo convert)")
    bp.add_argument("--size", type=count(8), help="view side, px (default 224; 32 with --backend cifar)")
    bp.add_argument("--batch", type=count(1), default=64)
    bp.add_argument("--batches", type=count(1), default=16, help="timed batches per repeat")
    bp.add_argument("--warmup", type=count(0), default=4, help="untimed batches first (every worker started)")
    bp.add_argument("--repeats", type=count(1), default=5, help="interleaved passes over every contender")
    bp.add_argument("--workers", type=count(0), default=0, help="decoding processes or threads (0: one per core)")
    bp.add_argument("--device", choices=DEVICES, default="auto")
    bp.add_argument("--placement", choices=["auto", "device", "workers"], default="auto",
                    help="folder and ffcv: where the recipe after the crop runs (augment.place); auto: device on a "
                         "GPU, workers on a CPU")
    bp.add_argument("--json", help="output file (default: benchmarks/results/pipeline_<backend>[_<placement>]_"
                                   "<device>.json)")
    bp.set_defaults(func=pipeline)


def _tile(text: str):
    return text if text == "auto" else count(1)(text)


def _device(name: str):
    from dogo.engine.config import resolve_device
    from dogo.engine.dist.distributed import pick_device
    return pick_device(resolve_device(name))


def _write(default: str, given: str | None, result: dict) -> Path:
    from dogo.core.environment import device_tag
    from dogo.core.io import write_json
    out = Path(given or default.format(device=device_tag(result["environment"])))
    write_json(out, result)
    return out


def train(args) -> int:
    from dogo.benchmarks.train_step import bench_train, summary
    from dogo.engine import config as config_mod
    from dogo.engine.dist import distributed
    cfg = config_mod.load(args.config, args.overrides)
    result = bench_train(cfg, args.warmup, args.steps, args.repeats, args.peak_tflops)
    if distributed.rank() == 0:
        out = _write(f"benchmarks/results/train_{cfg.name}_{result['image_size']}px_{{device}}.json", args.json,
                     result)
        say(f"{summary(result, cfg.name)}; wrote {out}")
    distributed.shutdown()
    return 0


def loss(args) -> int:
    from dogo.benchmarks.loss import COLUMNS, bench_loss, table_rows
    device = str(_device(args.device))
    result = bench_loss(args.views, args.dim, args.tile, args.objective, args.dtype, device, args.repeats,
                        args.max_seconds, log=say)
    out = _write(f"benchmarks/results/loss_{args.objective}_{{device}}.json", args.json, result)
    env = result["environment"]
    table = Table(title=f"contrastive loss ({args.objective}, d={args.dim}, tile {args.tile}) on "
                        f"{env['gpu'] or 'CPU'}")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for row in table_rows(result):
        table.add_row(*row)
    console.print(table)
    say(f"goal: {result['goal']}; wrote {out}")
    return 0


def pipeline(args) -> int:
    from dogo.benchmarks.pipeline import bench_cifar, bench_pipeline, summary
    from dogo.core.errors import ConfigError
    if args.backend == "ffcv" and not args.beton:
        raise ConfigError("--backend ffcv needs --beton: the --data split converted with `dogo convert`")
    device = _device(args.device)
    workers = args.workers or os.cpu_count()
    if args.backend == "cifar":
        size = args.size or 32
        result = bench_cifar(Path(args.data), size, args.batch, args.batches, args.warmup, args.repeats, workers,
                             device, log=say)
        tag = "cifar"
    else:
        size = args.size or 224
        result = bench_pipeline(args.backend, Path(args.data), args.beton, size, args.batch, args.batches,
                                args.warmup, args.repeats, workers, device, args.placement, log=say)
        tag = f"{args.backend}_{result['placement']}" if args.backend in ("folder", "ffcv") else args.backend
    out = _write(f"benchmarks/results/pipeline_{tag}_{{device}}.json", args.json, result)
    say(f"{summary(result, args.backend, size)}; wrote {out}")
    return 0


def recipe(args) -> int:
    from dogo.benchmarks.recipe import bench_recipe
    result = bench_recipe(args.size, args.batch, args.repeats, args.compile, args.reference, args.reference_optim,
                          _device(args.device), log=say)
    say(f"wrote {_write(f'benchmarks/results/recipe_{args.size}px_{{device}}.json', args.json, result)}")
    return 0

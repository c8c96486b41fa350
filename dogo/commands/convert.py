"""dogo convert: an image-folder split to FFCV's .beton (pipelines/convert.py does the work)."""
from __future__ import annotations

from dogo.commands.args import count, number, say
from dogo.pipelines.convert import WRITE_MODES, ConvertOptions

HELP = "an image-folder split to FFCV's .beton (classes and report beside it)"
DESCRIPTION = (
    "an image-folder split to FFCV's .beton, options with FFCV's meanings; labels are the sorted class folders (as "
    "ImageFolder), or with --labels none every image at any depth, label -1; FFCV's page is sized to the largest "
    "image; files that do not decode (libjpeg's corrupt-data warnings included), entries that cannot be listed and "
    "images beside the class folders are skipped and reported; NAME.classes.json (class names, counts) and "
    "NAME.report.json (skipped files and why) beside DST (NAME: DST without .beton); written as DST.partial and "
    "renamed when complete, so an interrupted conversion leaves nothing under DST")


def add(sub) -> None:
    c = sub.add_parser("convert", help=HELP, description=DESCRIPTION)
    c.add_argument("src", help="image-folder split: SRC/<class_name>/<image>, e.g. /imagenet/train")
    c.add_argument("dst", help="output file, e.g. /data/imagenet_train.beton")
    c.add_argument("--max-resolution", type=count(1), help="longer side at most this many pixels (default: keep)")
    c.add_argument("--write-mode", choices=WRITE_MODES, default=ConvertOptions.write_mode,
                   help="FFCV's: raw pixels, JPEG, a --compress-probability share as JPEG, or smart [raw]")
    c.add_argument("--jpeg-quality", type=count(1), default=90, help="JPEG quality of stored JPEGs, 1-100 [90]")
    c.add_argument("--compress-probability", type=number(0.0, inclusive=True, maximum=1.0), default=0.5,
                   help="write-mode proportion: share as JPEG [0.5]")
    c.add_argument("--smart-threshold", type=count(1), help="write-mode smart: images above this many raw bytes "
                                                            "as JPEG")
    c.add_argument("--num-workers", type=count(0), default=0, help="processes (0: one per core)")
    c.add_argument("--chunk-size", type=count(1), default=100, help="images per unit of work of a writer process "
                                                                    "[100]")
    c.add_argument("--strict", action="store_true", help="the first bad file is an error (default: skip and report)")
    c.add_argument("--labels", choices=("folders", "none"), default="folders",
                   help="folders: SRC/<class_name>/<image>; none: every image under SRC at any depth, unlabelled "
                        "(label -1; train with data.labels=none) [folders]")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output")
    c.set_defaults(func=run)


def run(args) -> int:
    from dogo.core.errors import ConfigError
    from dogo.pipelines.convert import convert
    if args.jpeg_quality > 100:
        raise ConfigError(f"--jpeg-quality is 1-100, got {args.jpeg_quality}")
    options = ConvertOptions(max_resolution=args.max_resolution, write_mode=args.write_mode,
                             jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
                             smart_threshold=args.smart_threshold, num_workers=args.num_workers,
                             chunk_size=args.chunk_size, strict=args.strict, labels=args.labels)
    try:
        convert(args.src, args.dst, options, overwrite=args.overwrite, log=say)
    except KeyboardInterrupt:
        say(f"interrupted: nothing was written to {args.dst}")
        return 130
    return 0

"""Typed, strict configuration: one dataclass per section, YAML in, `key=value` overrides, unknown keys rejected.

Every error names the offending key (and the file or override it came from) and, for a misspelt key, the nearest
valid one. The resolved config is what a run writes beside its results and stores in its checkpoints.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from dogo.engine.io import atomic_write_text


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message says which and what to do."""


@dataclass
class DataConfig:
    backend: str = "folder"  # where two-view batches come from: a registered backend (dogo.pipelines.BACKENDS)
    path: str = "data/shapes64"  # root holding one folder per split (ImageNet layout: train/, val/); cifar: the
    # cifar-10-batches-py or cifar-100-python folder (splits train and test)
    beton: str = ""  # backend ffcv: the training split as a .beton (dogo convert); evaluation still reads `path`
    order: Literal["random", "quasi_random"] = "random"  # ffcv: quasi_random reads the file in shuffled blocks
    os_cache: bool = True  # ffcv: read through the OS page cache (False: FFCV's own process cache)
    ffcv_image_field: str = "image"  # ffcv: the .beton's RGB image field (stock FFCV scripts may write e.g. 'img')
    ffcv_label_field: str = "label"  # ffcv: its integer label field (e.g. 'target')
    dali_hw_decoder_load: float = 0.65  # dali on a GPU: share of the JPEGs given to the hardware decoder
    # dali: before the first batch every file is checked (DALI can crash or train on garbage on a broken file).
    # whole: every byte read and every JPEG decoded at 1/8 scale in processes (corrupt data found, also what breaks
    # no structure); ends: the first 64 kB and the last bytes, nothing decoded (truncation and declared size only: a
    # much faster start on a dataset already checked, e.g. by dogo convert)
    dali_scan: Literal["whole", "ends"] = "whole"
    train_split: str = "train"
    val_split: str = "val"  # labelled split the kNN monitor queries
    image_size: int = 64  # side of each training view, pixels
    batch_size: int = 256  # images per step over all ranks (each image yields two views per peer)
    workers: int = 4  # decoding processes per rank; 0 decodes in the training process
    synthetic_images: int = 2048  # dataset size of the synthetic backend (random pixels, for speed tests)


@dataclass
class AugmentConfig:
    """The SimCLR recipe (docs/algorithms.md); every random parameter is drawn per image."""
    # where the recipe after the crop runs: device (batched, on the training device), workers (per image in uint8 in
    # the loader's worker processes or threads; folder and ffcv backends), auto: device on CUDA, workers on CPUs
    place: Literal["auto", "device", "workers"] = "auto"
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5  # 0 for 32 px images, as SimCLR does on CIFAR
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1  # kernel side as a fraction of the view side (made odd)
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class PeerConfig:
    arch: str = "resnet18"  # a registered backbone name (dogo.models.BACKBONES)
    cifar_stem: bool = False  # 3x3 stride-1 first conv and no max-pool, for 32-64 px images
    zero_init_residual: bool = False  # ResNets: each block's last BN starts at zero scale (SimCLR's init)
    head_hidden: int = 2048  # DisCo widens the student's head to 2048 against the distilling bottleneck
    head_out: int = 128
    # The peer's own SSL method (dogo.engine.methods.METHODS). None: the objective's method when it names one
    # (objective.name=simclr, mocov2, ...), else simclr.
    ssl: Optional[str] = None
    tau: Optional[float] = None  # NT-Xent / InfoNCE temperature; None: the method's default (simclr 0.1, mocov2 0.2)
    kl_weight: float = 1.0  # DoGo lambda_k on KL(P_peer || P_k), per-row mean ('batchmean')
    pred_hidden: int = 512  # simsiam: hidden width of the predictor (SimSiam's bottleneck)
    momentum: float = 0.999  # mocov2: key encoder EMA momentum (at the start, with the cosine schedule)
    momentum_schedule: Literal["constant", "cosine"] = "constant"  # cosine: from `momentum` to 1 over the run
    queue_size: int = 65536  # mocov2: negatives kept; starts as random unit keys (seeded), as MoCo's does
    # mocov2: false is MoCo v2's own loss (view-1 queries against view-2 keys; every rank's view-2 keys enqueued).
    # true averages both directions and enqueues both views' keys (the queue turns over twice as fast).
    moco_symmetric: bool = False
    lr: Optional[float] = None  # per 256 images; None takes optim.lr
    weight_decay: Optional[float] = None  # None takes optim.weight_decay


@dataclass
class ObjectiveConfig:
    # a method's name (simclr, mocov2, simsiam): every peer learns alone with it. dogo: two peers, each with its own
    # method (peers.X.ssl) plus the KL to the other. disco: students distilled from a frozen `teacher`.
    name: str = "dogo"
    tau_kl: float = 0.1  # temperature of the cross-view similarity softmax in the DoGo KL term
    # disco: weight of the squared distance to the teacher's embedding, summed over both views, the dimensions and
    # this rank's images: DisCo's MSELoss(reduction='sum') per GPU, weight 1 (its 256 images on 8 GPUs: 32 per
    # GPU). The pull therefore grows with the per-rank batch b: to keep DisCo's strength at b, use 32 / b.
    distill_weight: float = 1.0
    share_views: bool = False  # dogo: both peers see the same two views (half the decoding and augmentation)
    # images per tile of the contrastive kernel (rows and columns); its blocks grow as tile^2. auto: on CUDA the
    # largest power of two whose blocks take at most an eighth of the free memory (few tiles, few launches), 1024
    # on CPUs
    tile: Union[Literal["auto"], int] = "auto"


@dataclass
class TeacherConfig:
    """DisCo's frozen teacher: a peer of a dogo run (checkpoint), or plain state_dict files (backbone + head)."""
    checkpoint: str = ""  # a dogo checkpoint file or run folder (its newest checkpoint)
    peer: str = ""  # which peer of that checkpoint; empty: its only peer
    backbone: str = ""  # or: a torchvision-format backbone state_dict (classifier keys are ignored) ...
    head: str = ""  # ... and its projection head's state_dict (sizes are read from it)
    arch: str = ""  # with backbone/head files: the backbone's registered name, e.g. resnet50
    cifar_stem: bool = False  # with backbone/head files
    # eval: BatchNorm with the teacher's running statistics (our default). batch: each view's batch statistics, as
    # DisCo's code (model.train() on the teacher too), without updating the running statistics.
    bn: Literal["eval", "batch"] = "eval"


@dataclass
class OptimConfig:
    name: Literal["lars", "sgd", "adamw"] = "lars"
    lr: float = 0.3  # learning rate per 256 images; scaled linearly by the global batch
    weight_decay: float = 1e-6  # never applied to biases and norm parameters
    momentum: float = 0.9  # lars and sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    eps: float = 1e-8  # adamw
    trust_coefficient: float = 0.001  # lars eta
    clip_grad_norm: float = 0.0  # max global grad norm; 0 turns clipping off


@dataclass
class ScheduleConfig:
    epochs: int = 100
    warmup_epochs: float = 10.0  # linear warm-up from 0, then cosine to final_lr_ratio x lr
    final_lr_ratio: float = 0.0
    max_steps: int = 0  # if > 0, the run (and its schedule) is this many steps instead of `epochs`


@dataclass
class PrecisionConfig:
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA
    # torch.compile (Triton on CUDA, C++ on CPUs; a compilation at the start, about a minute on CPUs). on: the
    # device recipe's whole chain fused (fewer passes over memory); peers: also each peer's forward (backbone and
    # head), the training step's many small launches fused. Off until a GPU run shows it faster.
    compile: Literal["off", "on", "peers"] = "off"


@dataclass
class DistributedConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    sync_bn: bool = False  # batch statistics over all ranks (SimCLR's global BN)
    timeout_min: float = 30.0


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also at every epoch end; 0 means epoch ends only
    keep: int = 3  # newest checkpoints kept
    resume: str = "auto"  # auto (newest in the run folder, else start fresh) | none | a checkpoint path


@dataclass
class EvalConfig:
    knn_every_epochs: int = 1  # kNN monitor at epoch ends; 0 turns it off
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_bank_images: int = 0  # train images in the kNN feature bank; 0 takes the whole split
    batch_size: int = 256  # per rank, for feature extraction


@dataclass
class LogConfig:
    every: int = 20  # steps between metric lines (the only host syncs in the hot loop)
    progress: Literal["auto", "on", "off"] = "auto"  # rich progress bar; auto: when stdout is a terminal
    tensorboard: Literal["auto", "on", "off"] = "auto"  # event files in RUN/tb; auto: when tensorboard is installed


@dataclass
class Config:
    name: str = "run"  # the run folder is out_dir/name
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    peers: dict[str, PeerConfig] = field(default_factory=lambda: {"r18": PeerConfig()})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# --------------------------------------------------------------------------------------------------------------
# Building and checking

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _suggest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
    return f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for option in inner:  # the first type that takes the value (e.g. 'auto' or an integer)
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc).split(": ", 1)[-1])
        raise ConfigError(f"{key}: " + "; or ".join(errors))
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return build(tp, value, prefix=key)
    if origin is dict:
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"{key}: expected a non-empty mapping of name -> settings, got {value!r}")
        return {str(k): _coerce(v or {}, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string: a number was meant
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def build(cls: type, raw: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with the nearest valid one."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise ConfigError(f"unknown key '{full}'" + _suggest(str(key), names))
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def apply_override(cfg: Config, override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML (0.3, true, [1, 2], null)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key=value (e.g. optim.lr=0.6)")
    path, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{override}': the value is not valid YAML ({exc})") from None
    parts = path.strip().split(".")
    node: Any = cfg
    for depth, part in enumerate(parts):
        done = ".".join(parts[:depth])
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            if part not in node:
                raise ConfigError(f"override '{override}': no entry '{part}' under '{done}'" + _suggest(part, list(node)))
            if last:
                node[part] = _coerce(value, type(node[part]), path)
            node = node[part]
            continue
        hints = typing.get_type_hints(type(node))
        if part not in hints:
            where = f" under '{done}'" if done else ""
            raise ConfigError(f"override '{override}': unknown key '{part}'{where}" + _suggest(part, list(hints)))
        if last:
            setattr(node, part, _coerce(value, hints[part], path))
        node = getattr(node, part)


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (None: the defaults), apply overrides, and check the whole for consistency."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; the shipped ones are in configs/")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        cfg = build(Config, raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    for override in overrides:
        apply_override(cfg, override)
    resolve(cfg)
    check(cfg)
    return cfg


def resolve(cfg: Config) -> None:
    """Fill the defaults that depend on other keys, once, so that the written config says what ran and the step
    reads resolved values: each peer's method and temperature."""
    from dogo.engine.methods import method_named
    from dogo.engine.objectives import objective_named
    objective = objective_named(cfg.objective.name)
    for name, peer in cfg.peers.items():
        if objective.method and peer.ssl not in (None, objective.method):
            raise ConfigError(f"peers.{name}.ssl={peer.ssl} conflicts with objective.name={objective.method}; "
                              f"peers with their own SSL methods train together under objective.name=dogo")
        peer.ssl = peer.ssl or objective.method or "simclr"
        method = method_named(peer.ssl, f"peers.{name}.ssl")
        if peer.tau is None:
            peer.tau = method.default_tau


def check(cfg: Config) -> None:
    """Cross-field checks that single types cannot express."""
    from dogo.engine.methods import method_named
    from dogo.engine.objectives import objective_named
    from dogo.pipelines import backend_named
    backend_named(cfg.data.backend)
    _check_finite(to_dict(cfg), "")  # before the range checks, which NaN would pass (NaN < 0 is false)
    objective_named(cfg.objective.name).check(cfg)
    positive = {"data.batch_size": cfg.data.batch_size, "data.image_size": cfg.data.image_size,
                "schedule.epochs": cfg.schedule.epochs, "log.every": cfg.log.every, "checkpoint.keep": cfg.checkpoint.keep,
                "eval.knn_k": cfg.eval.knn_k, "eval.batch_size": cfg.eval.batch_size}
    if cfg.objective.tile != "auto":
        positive["objective.tile"] = cfg.objective.tile
    for name, peer in cfg.peers.items():
        positive.update({f"peers.{name}.head_hidden": peer.head_hidden, f"peers.{name}.head_out": peer.head_out,
                         f"peers.{name}.pred_hidden": peer.pred_hidden})
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    at_least_zero = {"data.workers": cfg.data.workers, "checkpoint.every_steps": cfg.checkpoint.every_steps,
                     "optim.lr": cfg.optim.lr, "optim.weight_decay": cfg.optim.weight_decay,
                     "schedule.max_steps": cfg.schedule.max_steps, "eval.knn_every_epochs": cfg.eval.knn_every_epochs,
                     **{f"peers.{n}.{k}": getattr(p, k) for n, p in cfg.peers.items()
                        for k in ("lr", "weight_decay", "kl_weight") if getattr(p, k) is not None}}
    for key, value in at_least_zero.items():
        if value < 0:
            raise ConfigError(f"{key} must be 0 or more, got {value}")
    a = cfg.augment
    for key in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
        if not 0 <= getattr(a, key) <= 1:
            raise ConfigError(f"augment.{key} is a probability: it must be in [0, 1], got {getattr(a, key)}")
    if cfg.name in ("", ".", "..") or Path(cfg.name).name != cfg.name:
        raise ConfigError(f"name={cfg.name!r} must be a plain folder name: the run folder is out_dir/name and may "
                          f"not lie outside out_dir (set out_dir to choose where runs go)")
    for name, peer in cfg.peers.items():
        if peer.tau is not None and peer.tau <= 0:
            raise ConfigError(f"peers.{name}.tau must be positive, got {peer.tau}")
        method_named(peer.ssl, f"peers.{name}.ssl").check(f"peers.{name}", peer, cfg)
        if peer.zero_init_residual and not peer.arch.startswith("resnet"):
            raise ConfigError(f"peers.{name}.zero_init_residual applies to ResNets only, not {peer.arch}")
    _check_recipe(cfg.augment)
    if cfg.data.image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"data.image_size={cfg.data.image_size} is too small: views of at least {MIN_IMAGE_SIZE} px "
                          f"(the backbones downsample by up to 32 and the blur needs a border)")
    from dogo.models import BACKBONES
    for name, peer in cfg.peers.items():
        if peer.arch not in BACKBONES:
            raise ConfigError(f"peers.{name}.arch: {peer.arch!r} is not a registered backbone"
                              + _suggest(peer.arch, sorted(BACKBONES)).replace("valid keys", "registered"))
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: {cfg.device!r} is not one of 'auto', 'cpu', 'cuda'")


MIN_IMAGE_SIZE = 8


def _check_finite(node: Any, key: str) -> None:
    """Every number of the config finite: NaN and inf pass every comparison-based range check."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{key} must be a finite number, got {node}")


def _check_recipe(a: AugmentConfig) -> None:
    """Ranges of the recipe's numbers (torchvision's own limits where it has them)."""
    lo, hi = a.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"augment.crop_scale must satisfy 0 < min <= max <= 1, got {a.crop_scale}")
    if not 0 < a.crop_ratio[0] <= a.crop_ratio[1]:
        raise ConfigError(f"augment.crop_ratio must satisfy 0 < min <= max, got {a.crop_ratio}")
    for key in ("brightness", "contrast", "saturation"):
        if getattr(a, key) < 0:
            raise ConfigError(f"augment.{key} is a jitter strength: 0 or more, got {getattr(a, key)}")
    if not 0 <= a.hue <= 0.5:
        raise ConfigError(f"augment.hue is a shift in turns: it must be in [0, 0.5], got {a.hue}")
    if not 0 < a.blur_sigma[0] <= a.blur_sigma[1]:
        raise ConfigError(f"augment.blur_sigma must satisfy 0 < min <= max, got {a.blur_sigma}")
    if a.blur_kernel_fraction <= 0:
        raise ConfigError(f"augment.blur_kernel_fraction must be positive, got {a.blur_kernel_fraction}")
    if min(a.std) <= 0:
        raise ConfigError(f"augment.std must be positive in every channel, got {a.std}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_text(cfg: Config) -> str:
    """The resolved config as YAML (tuples as lists so that it loads back)."""
    return yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False)


def dump(cfg: Config, path: Path) -> None:
    atomic_write_text(path, dump_text(cfg))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def from_dict(raw: dict) -> Config:
    cfg = build(Config, raw)
    resolve(cfg)
    return cfg

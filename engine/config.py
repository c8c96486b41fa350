"""Typed, strict configuration: one dataclass per section, YAML in (a file may extend another with `base:`),
`key=value` overrides, unknown keys rejected, then every `auto` and every default that depends on other keys
resolved once (`resolve`), before anything is built.

Every error names the offending key (and the file or override it came from) and, for a misspelt key, the nearest
valid one. The resolved config is what a run writes beside its results and stores in its checkpoints; everything
downstream reads its resolved values and none resolves them again.

A method (peers.NAME.ssl) or a data backend (data.backend) with settings of its own declares them as a dataclass in
its registry entry; they are the sub-section named after it (peers.r18.mocov2.queue_size, data.ffcv.beton).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import yaml

from dogo.engine.errors import ConfigError, suggest
from dogo.engine.io import atomic_write_text
from dogo.engine.ssl.contrastive import auto_tile
from dogo.engine.ssl.methods import METHODS
from dogo.engine.ssl.objectives import objective_named
from dogo.models import backbone_spec
from dogo.pipelines import BACKENDS




@dataclass
class DataConfig:
    # where two-view batches come from: a registered backend (dogo.pipelines.BACKENDS); its own settings are the
    # sub-section named after it, e.g. data.ffcv.beton, data.dali.scan
    backend: str = "folder"
    # the dataset root, one folder per split, each class_name/image.jpg (ImageNet's layout: train/, val/); cifar: the
    # cifar-10-batches-py or cifar-100-python folder (splits train and test)
    path: str = "data/shapes64"
    train_split: str = "train"  # the split folder SSL trains on (and the kNN bank and probes' training images)
    val_split: str = "val"  # labelled split the kNN monitor queries
    # folders: the training split's class folders name the labels (ImageFolder's layout); none: every image at any
    # depth under the training split, unlabelled (folder and dali backends; ffcv: a .beton converted with --labels
    # none); evaluation then needs a labelled dataset named on its command line
    labels: Literal["folders", "none"] = "folders"
    image_size: int = 64  # side of each training view, pixels
    batch_size: int = 256  # images per step over all ranks (each image yields two views per peer)
    workers: int = 4  # decoding processes per rank; 0 decodes in the training process


def with_sections(base: type, registry, attribute: str) -> type:
    """`base` with one more field per registry entry whose `attribute` is a settings dataclass, named after the
    entry: the sub-sections a method or a backend declares."""
    extra = [(name, getattr(entry, attribute), field(default_factory=getattr(entry, attribute)))
             for name, entry in registry.items() if getattr(entry, attribute, None) is not None]
    cls = dataclasses.make_dataclass(base.__name__, extra, bases=(base,))
    cls.__module__, cls.__doc__ = __name__, base.__doc__
    return cls


DataConfig = with_sections(DataConfig, BACKENDS, "settings")


@dataclass
class AugmentConfig:
    """The SimCLR recipe (docs/algorithms.md); every random parameter is drawn per image."""
    # where the recipe after the crop runs: device (batched, on the training device), workers (per image in uint8 in
    # the loader's worker processes or threads; folder and ffcv backends), auto: device on CUDA, workers on CPUs
    place: Literal["auto", "device", "workers"] = "auto"
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio
    flip_p: float = 0.5  # horizontal flip probability
    jitter_p: float = 0.8  # colour jitter probability; its four operations in a random order per image
    brightness: float = 0.4  # colour jitter strengths (torchvision's ColorJitter): brightness ...
    contrast: float = 0.4  # ... contrast ...
    saturation: float = 0.4  # ... saturation ...
    hue: float = 0.1  # ... and hue (at most 0.5)
    grayscale_p: float = 0.2  # grayscale probability
    blur_p: float = 0.5  # 0 for 32 px images, as SimCLR does on CIFAR
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # Gaussian blur sigma range, drawn per image
    blur_kernel_fraction: float = 0.1  # kernel side as a fraction of the view side (made odd)
    solarize_p: float = 0.0  # solarisation probability
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # normalisation mean (ImageNet's)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # normalisation standard deviation (ImageNet's)


@dataclass
class PeerConfig:
    # a registered backbone (dogo.models.BACKBONES: resnet18, ...), or timm:<name>, any timm model (the timm extra)
    arch: str = "resnet18"
    arch_args: dict[str, Any] = field(default_factory=dict)  # timm: passed to timm.create_model, e.g. {patch_size: 4}
    cifar_stem: bool = False  # 3x3 stride-1 first conv and no max-pool, for 32-64 px images
    zero_init_residual: bool = False  # ResNets: each block's last BN starts at zero scale (SimCLR's init)
    # the projection head: hidden width, output (embedding) size, Linear layers; None takes the method's paper
    # default (simclr, mocov2, simsiam 2048-128 in 2 layers; byol 4096-256; vicreg, barlowtwins 8192-8192-8192)
    head_hidden: Optional[int] = None
    head_out: Optional[int] = None  # the embedding size (see head_hidden)
    head_layers: Optional[int] = None  # Linear layers: Linear-BN-ReLU blocks, then a Linear (see head_hidden)
    # The peer's own SSL method (dogo.engine.ssl.methods.METHODS). None: the objective's method when it names one
    # (objective.name=simclr, mocov2, ...), else simclr.
    ssl: Optional[str] = None
    tau: Optional[float] = None  # NT-Xent / InfoNCE temperature; None: the method's default (simclr 0.1, mocov2 0.2)
    kl_weight: float = 1.0  # DoGo lambda_k on KL(P_peer || P_k), per-row mean ('batchmean')
    lr: Optional[float] = None  # per 256 images; None takes optim.lr
    weight_decay: Optional[float] = None  # None takes optim.weight_decay


PeerConfig = with_sections(PeerConfig, METHODS, "settings")


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
    arch: str = ""  # with backbone/head files: the backbone's name, e.g. resnet50 or timm:vit_small_patch16_224
    arch_args: dict[str, Any] = field(default_factory=dict)  # with a timm arch: its timm.create_model arguments
    cifar_stem: bool = False  # with backbone/head files
    # eval: BatchNorm with the teacher's running statistics (our default). batch: each view's batch statistics, as
    # DisCo's code (model.train() on the teacher too), without updating the running statistics.
    bn: Literal["eval", "batch"] = "eval"


@dataclass
class OptimConfig:
    name: Literal["lars", "sgd", "adamw"] = "lars"  # fused on CUDA, foreach on CPUs
    lr: float = 0.3  # learning rate per 256 images; scaled linearly by the global batch
    weight_decay: float = 1e-6  # never applied to biases and norm parameters
    momentum: float = 0.9  # lars and sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    eps: float = 1e-8  # adamw
    trust_coefficient: float = 0.001  # lars eta
    clip_grad_norm: float = 0.0  # max global grad norm; 0 turns clipping off


@dataclass
class ScheduleConfig:
    epochs: int = 100  # passes over the training split
    warmup_epochs: float = 10.0  # linear warm-up from 0, then cosine to final_lr_ratio x lr
    final_lr_ratio: float = 0.0  # the cosine's end as a fraction of the peak learning rate
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
    timeout_min: float = 30.0  # collective timeout, minutes: a rank that stops answering ends the run


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also at every epoch end; 0 means epoch ends only
    keep: int = 3  # newest checkpoints kept
    # latest: the newest checkpoint in the run folder, else a fresh start (auto means the same) | none: a fresh
    # start, earlier checkpoints set aside | a checkpoint path
    resume: str = "latest"


@dataclass
class EvalConfig:
    knn_every_epochs: int = 1  # kNN monitor at epoch ends; 0 turns it off
    # the weighted kNN's k and temperature: dino (k=20, T=0.07: DINO's and solo-learn's), lightly (k=200, T=0.1:
    # lightly's CIFAR benchmark), or custom (set knn_k and knn_temperature); every kNN result names it
    knn_protocol: Literal["dino", "lightly", "custom"] = "dino"
    knn_k: Optional[int] = None  # set by the protocol unless custom
    knn_temperature: Optional[float] = None  # set by the protocol unless custom
    knn_bank_images: int = 0  # train images in the kNN feature bank; 0 takes the whole split
    # a linear classifier per peer on detached backbone features, trained beside SSL (its own SGD, momentum 0.9);
    # train top-1 in the log lines, val top-1 at every epoch end; the peers train bit-identically with it on or off
    online_probe: Literal["off", "on"] = "off"
    online_probe_lr: float = 0.1  # the online probe's SGD learning rate (constant)
    batch_size: int = 256  # per rank, for feature extraction


@dataclass
class LogConfig:
    every: int = 20  # steps between metric lines (the only host syncs in the hot loop)
    progress: Literal["auto", "on", "off"] = "auto"  # rich progress bar; auto: when stdout is a terminal
    tensorboard: Literal["auto", "on", "off"] = "auto"  # event files in RUN/tb; auto: when tensorboard is installed
    # Weights & Biases (the wandb extra): the same scalars as TensorBoard and the resolved config; offline writes
    # RUN/wandb for `wandb sync` later, online needs `wandb login`; a resumed run continues the same W&B run
    wandb: Literal["off", "online", "offline"] = "off"
    wandb_project: str = "dogo"  # the W&B project the run goes to
    wandb_entity: str = ""  # the W&B team or user; empty: your default entity


@dataclass
class Config:
    name: str = "run"  # the run folder is out_dir/name
    out_dir: str = "runs"  # parent of the run folder
    seed: int = 0  # initial weights, data order and every augmentation parameter derive from it
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when torch sees a GPU
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
# Reading

# Keys that moved into a method's or a backend's sub-section: old dotted tail -> new one (peers.NAME.<old>)
MOVED = {
    "PeerConfig": {"pred_hidden": "simsiam.pred_hidden", "momentum": "mocov2.momentum",
                   "momentum_schedule": "mocov2.momentum_schedule", "queue_size": "mocov2.queue_size",
                   "moco_symmetric": "mocov2.symmetric"},
    "DataConfig": {"beton": "ffcv.beton", "order": "ffcv.order", "os_cache": "ffcv.os_cache",
                   "ffcv_image_field": "ffcv.image_field", "ffcv_label_field": "ffcv.label_field",
                   "dali_hw_decoder_load": "dali.hw_decoder_load", "dali_scan": "dali.scan",
                   "synthetic_images": "synthetic.images"},
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _unknown(cls: type, key: str, full: str) -> ConfigError:
    """The error for a key `cls` does not have: where it moved, or the nearest valid key."""
    moved = MOVED.get(cls.__name__, {}).get(key)
    if moved:
        new = full[: len(full) - len(key)] + moved
        return ConfigError(f"'{full}' has moved into its method's or backend's own section: write '{new}'")
    return ConfigError(f"unknown key '{full}'" + suggest(str(key), [f.name for f in dataclasses.fields(cls)]))


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
    if origin is dict and args[1] is Any:  # free-form arguments (timm.create_model's), passed on as given
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping of argument names to values, got {value!r}")
        return dict(value)
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
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise _unknown(cls, str(key), full)
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
                raise ConfigError(f"override '{override}': no entry '{part}' under '{done}'" + suggest(part, list(node)))
            if last:
                node[part] = _coerce(value, type(node[part]), path)
            node = node[part]
            continue
        hints = typing.get_type_hints(type(node))
        if part not in hints:
            raise ConfigError(f"override '{override}': {_unknown(type(node), part, '.'.join(parts[:depth + 1]))}")
        if last:
            setattr(node, part, _coerce(value, hints[part], path))
        node = getattr(node, part)


def read_yaml(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file as a dict, with its `base:` (a path relative to the file) read first and overlaid: mappings
    merge key by key, except `peers`, which a file that sets it replaces whole (its peers are the run's peers)."""
    if not path.is_file():
        where = f" (the base of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file {path}{where} does not exist; the shipped ones are in configs/")
    if path.resolve() in [p.resolve() for p in _chain]:
        raise ConfigError(f"{path}: its base: chain comes back to itself ({' -> '.join(map(str, (*_chain, path)))})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected the path of another config file, got {base!r}")
    return _overlay(read_yaml(path.parent / base, (*_chain, path)), raw)


def _overlay(base: dict, top: dict, key: str = "") -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not (key == "" and k == "peers"):
            out[k] = _overlay(out[k], v, f"{key}.{k}" if key else k)
        else:
            out[k] = v
    return out


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (None: the defaults), apply overrides, resolve every `auto` for this machine and check
    the whole for consistency."""
    raw = read_yaml(Path(path)) if path is not None else {}
    try:
        cfg = build(Config, raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    for override in overrides:
        apply_override(cfg, override)
    resolve(cfg)
    check(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Resolving: every `auto` and every default that depends on other keys, once

def resolve(cfg: Config) -> Config:
    """Settle every `auto` for this machine and each peer's method and temperature, in place. Idempotent: a
    resolved config (a run's config.yaml, a checkpoint's) comes back unchanged."""
    cfg.device = resolve_device(cfg.device)
    on_gpu = cfg.device == "cuda"
    if on_gpu and cfg.objective.tile == "auto" and not torch.cuda.is_available():  # the tile needs the GPU's memory
        raise ConfigError("device=cuda but torch sees no CUDA device; use device=auto or device=cpu")
    if cfg.distributed.backend == "auto":
        cfg.distributed.backend = "nccl" if on_gpu else "gloo"
    if cfg.precision.dtype == "auto":
        cfg.precision.dtype = "bf16" if on_gpu else "fp32"  # bf16 is about 2x slower than fp32 on our CPUs
    if cfg.precision.channels_last == "auto":  # on a GPU, unless a peer's backbone gains nothing from it (a ViT)
        helps = all(backbone_spec(p.arch, f"peers.{n}.arch").channels_last for n, p in cfg.peers.items())
        cfg.precision.channels_last = "on" if on_gpu and helps else "off"
    if cfg.augment.place == "auto":
        # on a GPU, batched on the device; on CPUs, per image in uint8 in the loader's workers, which is cheaper
        # there since the device is the same cores as the model
        cfg.augment.place = "device" if on_gpu else "workers"
    if cfg.objective.tile == "auto":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")
        cfg.objective.tile = auto_tile(device, len(cfg.peers), cfg.data.batch_size)
    if cfg.log.tensorboard == "auto":
        cfg.log.tensorboard = "on" if _tensorboard_installed() else "off"
    if cfg.checkpoint.resume == "auto":
        cfg.checkpoint.resume = "latest"
    if cfg.log.progress == "auto":
        cfg.log.progress = "on" if sys.stdout.isatty() else "off"
    _resolve_knn(cfg.eval)
    objective = objective_named(cfg.objective.name)
    for name, peer in cfg.peers.items():
        if objective.method and peer.ssl not in (None, objective.method):
            raise ConfigError(f"peers.{name}.ssl={peer.ssl} conflicts with objective.name={objective.method}; "
                              f"peers with their own SSL methods train together under objective.name=dogo")
        peer.ssl = peer.ssl or objective.method or "simclr"
        method = METHODS.get(peer.ssl, f"peers.{name}.ssl")
        if peer.tau is None:
            peer.tau = method.default_tau
        hidden, out, layers = method.default_head
        peer.head_hidden = hidden if peer.head_hidden is None else peer.head_hidden
        peer.head_out = out if peer.head_out is None else peer.head_out
        peer.head_layers = layers if peer.head_layers is None else peer.head_layers
    return cfg


def _check_labels(cfg: Config) -> None:
    """Evaluation during training needs labels: unlabelled training data or a backend without labelled images
    cannot feed the kNN monitor or the online probe."""
    backend = BACKENDS.get(cfg.data.backend, "data.backend")
    if cfg.data.labels == "none" and not backend.unlabelled_training:
        raise ConfigError(f"data.labels=none: data.backend={cfg.data.backend} has no unlabelled mode; it applies to "
                          + ", ".join(n for n, b in BACKENDS.items() if b.unlabelled_training))
    wanted = [k for k, on in (("eval.knn_every_epochs", cfg.eval.knn_every_epochs > 0),
                              ("eval.online_probe=on", cfg.eval.online_probe == "on")) if on]
    if not wanted:
        return
    if cfg.data.labels == "none":
        raise ConfigError(f"data.labels=none: {' and '.join(wanted)} need labelled images; set "
                          f"eval.knn_every_epochs=0 eval.online_probe=off, and evaluate the run afterwards on a "
                          f"labelled dataset: dogo eval knn RUN data.path=LABELLED data.labels=folders")
    if cfg.eval.online_probe == "on" and not backend.labelled:
        raise ConfigError(f"eval.online_probe=on: data.backend={cfg.data.backend} has no labels to train it on; "
                          f"set eval.online_probe=off")


KNN_PROTOCOLS = {"dino": (20, 0.07), "lightly": (200, 0.1)}


def _resolve_knn(ev: EvalConfig) -> None:
    """The kNN protocol's k and temperature; a preset with a different k or temperature set beside it is an error
    (a result would name one protocol and have used another)."""
    if ev.knn_protocol == "custom":
        if ev.knn_k is None or ev.knn_temperature is None:
            raise ConfigError("eval.knn_protocol=custom needs eval.knn_k and eval.knn_temperature; or name a preset: "
                              + ", ".join(f"{n} (k={k}, T={t})" for n, (k, t) in KNN_PROTOCOLS.items()))
        return
    k, t = KNN_PROTOCOLS[ev.knn_protocol]
    for key, value, preset in (("knn_k", ev.knn_k, k), ("knn_temperature", ev.knn_temperature, t)):
        if value is not None and value != preset:
            raise ConfigError(f"eval.{key}={value} differs from eval.knn_protocol={ev.knn_protocol} ({key} {preset}); "
                              f"set eval.knn_protocol=custom to use your own")
    ev.knn_k, ev.knn_temperature = k, t


def knn_protocol_name(ev: EvalConfig) -> str:
    """How a result names its kNN protocol, e.g. 'dino (k=20, T=0.07)'."""
    return f"{ev.knn_protocol} (k={ev.knn_k}, T={ev.knn_temperature})"


def resolve_device(requested: str) -> str:
    """device=auto: cuda when torch sees a GPU, else cpu (also what the benchmarks' --device auto means)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def resolved_for(device: torch.device, **sections) -> Config:
    """The defaults, with `sections` (e.g. augment=AugmentConfig(...)), resolved for `device`: for the benchmarks
    that time a part of the step outside a run."""
    return resolve(Config(device=device.type, **sections))


def _tensorboard_installed() -> bool:
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard writes through it)
    except ImportError:
        return False
    return True


def unresolved(cfg: Config) -> list[str]:
    """The dotted keys that still say 'auto' (empty for a resolved config)."""
    out = []

    def walk(node, key):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else k)
        elif node == "auto":
            out.append(key)
    walk(to_dict(cfg), "")
    return out


def require_resolved(cfg: Config) -> None:
    left = unresolved(cfg)
    if left:
        raise ValueError(f"the config is not resolved ({', '.join(left)} still auto): build it with "
                         f"dogo.engine.config.load or pass it through resolve() first")


# --------------------------------------------------------------------------------------------------------------
# Checking

def check(cfg: Config) -> None:
    """Cross-field checks that single types cannot express."""
    BACKENDS.get(cfg.data.backend, "data.backend")
    _check_finite(to_dict(cfg, all_sections=True), "")  # before the range checks, which NaN would pass
    objective_named(cfg.objective.name).check(cfg)
    if cfg.precision.dtype == "fp16" and cfg.device != "cuda":
        raise ConfigError("precision.dtype=fp16 needs CUDA; use fp32 or bf16 on CPUs")
    if cfg.distributed.backend == "nccl" and cfg.device != "cuda":
        raise ConfigError("distributed.backend=nccl needs CUDA devices; use distributed.backend=gloo on CPUs")
    if cfg.log.wandb != "off" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"log.wandb={cfg.log.wandb} needs the wandb package: install the wandb extra "
                          f"(make setup, or pip install -e '.[wandb]'), or set log.wandb=off")
    if cfg.log.tensorboard == "on" and not _tensorboard_installed():
        raise ConfigError("log.tensorboard=on needs the tensorboard package: install the viz extra "
                          "(make setup, or pip install -e '.[viz]'), or set log.tensorboard=off")
    _check_labels(cfg)
    positive = {"data.batch_size": cfg.data.batch_size, "data.image_size": cfg.data.image_size,
                "schedule.epochs": cfg.schedule.epochs, "log.every": cfg.log.every, "checkpoint.keep": cfg.checkpoint.keep,
                "eval.knn_k": cfg.eval.knn_k, "eval.knn_temperature": cfg.eval.knn_temperature,
                "eval.batch_size": cfg.eval.batch_size}
    if cfg.objective.tile != "auto":
        positive["objective.tile"] = cfg.objective.tile
    for name, peer in cfg.peers.items():
        positive.update({f"peers.{name}.{k}": getattr(peer, k) for k in ("head_hidden", "head_out", "head_layers")})
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
    _check_sections(cfg)
    for name, peer in cfg.peers.items():
        if peer.tau is not None and peer.tau <= 0:
            raise ConfigError(f"peers.{name}.tau must be positive, got {peer.tau}")
        METHODS.get(peer.ssl, f"peers.{name}.ssl").check(f"peers.{name}", peer, cfg)
        backbone = backbone_spec(peer.arch, f"peers.{name}.arch")
        if peer.zero_init_residual and not backbone.zero_init_residual:
            raise ConfigError(f"peers.{name}.zero_init_residual: the {peer.arch} backbone has no residual blocks to "
                              f"start at zero; set it to false")
        if peer.cifar_stem and not backbone.cifar_stem:
            raise ConfigError(f"peers.{name}.cifar_stem applies to the torchvision backbones; give {peer.arch} its "
                              f"own arguments instead (peers.{name}.arch_args, e.g. a ViT's patch_size)")
        if peer.arch_args and backbone.library != "timm":
            raise ConfigError(f"peers.{name}.arch_args are timm.create_model's arguments; {peer.arch} is a "
                              f"torchvision backbone: remove them")
    _check_recipe(cfg.augment)
    if cfg.data.image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"data.image_size={cfg.data.image_size} is too small: views of at least {MIN_IMAGE_SIZE} px "
                          f"(the backbones downsample by up to 32 and the blur needs a border)")


def _check_sections(cfg: Config) -> None:
    """A sub-section set for a method or backend the run does not use is a mistake (it would be ignored)."""
    for name, peer in cfg.peers.items():
        for section, settings in _sections(peer, METHODS).items():
            if section != peer.ssl and settings != type(settings)():
                raise ConfigError(f"peers.{name}.{section} is set but peers.{name} learns with {peer.ssl}: set "
                                  f"peers.{name}.ssl={section}, or remove the section")
    for section, settings in _sections(cfg.data, BACKENDS).items():
        if section != cfg.data.backend and settings != type(settings)():
            raise ConfigError(f"data.{section} is set but data.backend={cfg.data.backend}: set "
                              f"data.backend={section}, or remove the section")


def _sections(node, registry) -> dict[str, Any]:
    return {f.name: getattr(node, f.name) for f in dataclasses.fields(node) if f.name in registry}


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


def to_dict(cfg: Config, all_sections: bool = False) -> dict:
    """The config as plain dicts; a peer keeps only its own method's sub-section and the data only its backend's
    (unless all_sections)."""
    out = dataclasses.asdict(cfg)
    if not all_sections:
        for name, peer in out["peers"].items():
            for section in METHODS:
                if section != peer["ssl"]:
                    peer.pop(section, None)
        for section in BACKENDS:
            if section != cfg.data.backend:
                out["data"].pop(section, None)
    return out


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


# What a run resolved for the machine it ran on; evaluating its checkpoint elsewhere resolves them again there.
MACHINE_KEYS = ("device", "distributed.backend", "precision.dtype", "precision.channels_last", "augment.place",
                "objective.tile", "log.progress", "log.tensorboard")


def from_dict(raw: dict, overrides: list[str] = (), this_machine: bool = False) -> Config:
    """A stored config (a checkpoint's) with `overrides` applied, resolved; keys that have moved since it was
    written are moved for it. this_machine: the MACHINE_KEYS go back to auto first (a GPU run's checkpoint evaluated
    on a CPU), unless an override sets them."""
    raw = _plain(raw)
    _move_keys(raw.get("data") or {}, MOVED["DataConfig"])
    for peer in (raw.get("peers") or {}).values():
        _move_keys(peer, MOVED["PeerConfig"])
    _name_knn_protocol(raw.get("eval") or {})
    cfg = build(Config, raw)
    if this_machine:
        for key in MACHINE_KEYS:
            node, _, leaf = key.rpartition(".")
            setattr(_at(cfg, node), leaf, "auto")
    for override in overrides:
        apply_override(cfg, override)
    # a preset's k and T are resolve's to fill in (the stored ones came from the stored preset); only values given
    # on this command line stay, to be checked against the preset
    keys = {o.partition("=")[0].strip() for o in overrides}
    if cfg.eval.knn_protocol != "custom":
        for key in ("knn_k", "knn_temperature"):
            if f"eval.{key}" not in keys:
                setattr(cfg.eval, key, None)
    return resolve(cfg)


def _name_knn_protocol(ev: dict) -> None:
    """A config written before eval.knn_protocol: the preset its k and temperature match, else custom."""
    if "knn_protocol" in ev or ("knn_k" not in ev and "knn_temperature" not in ev):
        return
    given = (ev.get("knn_k", 20), ev.get("knn_temperature", 0.07))  # the defaults then
    ev["knn_protocol"] = next((n for n, preset in KNN_PROTOCOLS.items() if preset == given), "custom")
    ev["knn_k"], ev["knn_temperature"] = given


def _at(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in filter(None, dotted.split(".")):
        node = getattr(node, part)
    return node


def _move_keys(node: dict, moved: dict[str, str]) -> None:
    for old, new in moved.items():
        if old in node:
            section, key = new.split(".")
            node.setdefault(section, {})[key] = node.pop(old)

"""Checks: what single types cannot express, across fields, run on every resolved config (a file's, a stored
one with a command's overrides), so that every command refuses the same mistakes with the same one line.

Reads the registries (dogo.core.registry) for each method's, objective's and backbone's own rules; imports nothing
above the config.
"""
from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import Any

from dogo.core.errors import ConfigError
from dogo.core.registry import BACKBONES, BACKENDS, METHODS, OBJECTIVES
from dogo.engine.config.loading import to_dict
from dogo.engine.config.resolve import group_size, overlaid, tensorboard_installed, view_recipe
from dogo.engine.config.schema import AugmentConfig, Config, section_names

def check(cfg: Config) -> None:
    """Cross-field checks that single types cannot express."""
    BACKENDS.get(cfg.data.backend, "data.backend")
    _check_finite(to_dict(cfg, all_sections=True), "")  # before the range checks, which NaN would pass
    OBJECTIVES.get(cfg.objective.name, "objective.name").check(cfg)
    if cfg.precision.dtype == "fp16" and cfg.device != "cuda":
        raise ConfigError("precision.dtype=fp16 needs CUDA; use fp32 or bf16 on CPUs")
    if cfg.precision.cuda_graphs == "on" and cfg.device != "cuda":
        raise ConfigError("precision.cuda_graphs=on needs CUDA (a CUDA graph replays GPU launches); set "
                          "precision.cuda_graphs=off on CPUs")
    if cfg.precision.cuda_graphs == "on" and cfg.precision.compile == "peers":
        raise ConfigError("precision.cuda_graphs=on captures the eager step and precision.compile=peers compiles "
                          "its forward: choose one (set precision.compile=off or on)")
    if cfg.distributed.backend == "nccl" and cfg.device != "cuda":
        raise ConfigError("distributed.backend=nccl needs CUDA devices; use distributed.backend=gloo on CPUs")
    if cfg.log.wandb != "off" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"log.wandb={cfg.log.wandb} needs the wandb package: install the wandb extra "
                          f"(make setup, or pip install -e '.[wandb]'), or set log.wandb=off")
    if cfg.log.tensorboard == "on" and not tensorboard_installed():
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
                     "log.heartbeat_s": cfg.log.heartbeat_s,
                     **{f"peers.{n}.{k}": getattr(p, k) for n, p in cfg.peers.items()
                        for k in ("lr", "weight_decay", "kl_weight") if getattr(p, k) is not None}}
    for key, value in at_least_zero.items():
        if value < 0:
            raise ConfigError(f"{key} must be 0 or more, got {value}")
    _check_optimiser(cfg)
    _check_peer_names(cfg)
    if cfg.name in ("", ".", "..") or Path(cfg.name).name != cfg.name:
        raise ConfigError(f"name={cfg.name!r} must be a plain folder name: the run folder is out_dir/name and may "
                          f"not lie outside out_dir (set out_dir to choose where runs go)")
    _check_sections(cfg)
    for name, peer in cfg.peers.items():
        if peer.tau is not None and peer.tau <= 0:
            raise ConfigError(f"peers.{name}.tau must be positive, got {peer.tau}")
        METHODS.get(peer.ssl, f"peers.{name}.ssl").check(f"peers.{name}", peer, cfg)
        backbone = BACKBONES.get(peer.arch, f"peers.{name}.arch")
        if peer.zero_init_residual and not backbone.zero_init_residual:
            raise ConfigError(f"peers.{name}.zero_init_residual: the {peer.arch} backbone has no residual blocks to "
                              f"start at zero; set it to false")
        if peer.cifar_stem and not backbone.cifar_stem:
            raise ConfigError(f"peers.{name}.cifar_stem: {peer.arch} takes no CIFAR stem (the torchvision ResNets, "
                              f"EfficientNet and MobileNet do; the CIFAR ResNets resnet20-110 are built for small "
                              f"images already): set it to false; a timm model takes its own arguments instead "
                              f"(peers.{name}.arch_args, e.g. a ViT's patch_size)")
        if peer.arch_args and backbone.library != "timm":
            raise ConfigError(f"peers.{name}.arch_args are timm.create_model's arguments; {peer.arch} is a "
                              f"{backbone.library} backbone: remove them")
    _check_recipe(cfg.augment, "augment")
    if cfg.data.image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"data.image_size={cfg.data.image_size} is too small: views of at least {MIN_IMAGE_SIZE} px "
                          f"(the backbones downsample by up to 32 and the blur needs a border)")
    _check_views(cfg)


def _check_optimiser(cfg: Config) -> None:
    """The optimiser's and schedules' numbers in the ranges their formulas assume (torch would raise deep inside,
    or a negative learning rate would train backwards)."""
    o, s, e = cfg.optim, cfg.schedule, cfg.eval
    if not 0 <= s.final_lr_ratio <= 1:
        raise ConfigError(f"schedule.final_lr_ratio is the cosine's end as a fraction of the peak learning rate: it "
                          f"must be in [0, 1], got {s.final_lr_ratio}")
    if s.warmup_epochs < 0:
        raise ConfigError(f"schedule.warmup_epochs must be 0 or more, got {s.warmup_epochs}")
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {o.momentum}")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas are AdamW's moment decays: each in [0, 1), got {list(o.betas)}")
    for key, value in (("optim.eps", o.eps), ("optim.trust_coefficient", o.trust_coefficient),
                       ("eval.online_probe_lr", e.online_probe_lr)):
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    for key, value in (("optim.clip_grad_norm", o.clip_grad_norm), ("eval.knn_bank_images", e.knn_bank_images)):
        if value < 0:
            raise ConfigError(f"{key} must be 0 or more, got {value}")


PEER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _check_peer_names(cfg: Config) -> None:
    """A peer's name is a key of its checkpoint, a module name and a part of dotted config keys: a plain word."""
    for name in cfg.peers:
        if not PEER_NAME.fullmatch(name):
            raise ConfigError(f"peers: {name!r} is not a usable peer name: a letter or _, then letters, digits, _ "
                              f"or - (no dots or spaces), e.g. r18")


def _check_sections(cfg: Config) -> None:
    """A sub-section set for a method or backend the run does not use is a mistake (it would be ignored)."""
    for name, peer in cfg.peers.items():
        for section, settings in _sections(peer).items():
            if section != peer.ssl and settings != type(settings)():
                raise ConfigError(f"peers.{name}.{section} is set but peers.{name} learns with {peer.ssl}: set "
                                  f"peers.{name}.ssl={section}, or remove the section")
    for section, settings in _sections(cfg.data).items():
        if section != cfg.data.backend and settings != type(settings)():
            raise ConfigError(f"data.{section} is set but data.backend={cfg.data.backend}: set "
                              f"data.backend={section}, or remove the section")


def _sections(node) -> dict[str, Any]:
    return {name: getattr(node, name) for name in section_names(type(node))}


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


def _check_recipe(a: AugmentConfig, prefix: str) -> None:
    """Ranges of the recipe's numbers (torchvision's own limits where it has them); prefix: where they were set
    (augment, or a view group's overrides)."""
    for key in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
        if not 0 <= getattr(a, key) <= 1:
            raise ConfigError(f"{prefix}.{key} is a probability: it must be in [0, 1], got {getattr(a, key)}")
    lo, hi = a.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"{prefix}.crop_scale must satisfy 0 < min <= max <= 1, got {a.crop_scale}")
    if not 0 < a.crop_ratio[0] <= a.crop_ratio[1]:
        raise ConfigError(f"{prefix}.crop_ratio must satisfy 0 < min <= max, got {a.crop_ratio}")
    for key in ("brightness", "contrast", "saturation"):
        if getattr(a, key) < 0:
            raise ConfigError(f"{prefix}.{key} is a jitter strength: 0 or more, got {getattr(a, key)}")
    if not 0 <= a.hue <= 0.5:
        raise ConfigError(f"{prefix}.hue is a shift in turns: it must be in [0, 0.5], got {a.hue}")
    if not 0 < a.blur_sigma[0] <= a.blur_sigma[1]:
        raise ConfigError(f"{prefix}.blur_sigma must satisfy 0 < min <= max, got {a.blur_sigma}")
    if a.blur_kernel_fraction <= 0:
        raise ConfigError(f"{prefix}.blur_kernel_fraction must be positive, got {a.blur_kernel_fraction}")
    if min(a.std) <= 0:
        raise ConfigError(f"{prefix}.std must be positive in every channel, got {a.std}")


def _check_views(cfg: Config) -> None:
    """The plan of views: named groups, the first of at least two views at data.image_size, sizes decreasing (one
    forward per size), each view's recipe in range."""
    previous = None
    for g, (name, group) in enumerate(cfg.views.items()):
        key = f"views.{name}"
        if not PEER_NAME.fullmatch(name):
            raise ConfigError(f"views: {name!r} is not a usable group name: a letter or _, then letters, digits, _ "
                              f"or - (e.g. global, local)")
        least = 2 if g == 0 else 1
        if group.count < least:
            reason = "the large crops are paired by every method" if g == 0 else "a group holds views"
            raise ConfigError(f"{key}.count={group.count}: {reason}: at least {least}")
        size = group_size(group, cfg.data.image_size)
        if g == 0 and size != cfg.data.image_size:
            raise ConfigError(f"{key}.size={size} differs from data.image_size={cfg.data.image_size}: the first "
                              f"group's views are the models' input and the evaluation size; set data.image_size "
                              f"(or leave {key}.size empty)")
        if size < MIN_IMAGE_SIZE:
            raise ConfigError(f"{key}.size={size} is too small: views of at least {MIN_IMAGE_SIZE} px")
        if previous is not None and size >= previous[1]:
            raise ConfigError(f"{key}.size={size} is not below views.{previous[0]}.size={previous[1]}: one forward "
                              f"per size, largest first; put views of one size into one group (view_recipe sets "
                              f"what differs per view)")
        previous = (name, size)
        _check_recipe(overlaid(cfg.augment, group.recipe), f"{key}.recipe")
        for k in group.view_recipe:
            if not (k.isdigit() and int(k) < group.count):
                raise ConfigError(f"{key}.view_recipe.{k}: views are numbered 0 to {group.count - 1} ({key}.count)")
            _check_recipe(view_recipe(cfg.augment, group, int(k)), f"{key}.view_recipe.{k}")
    for name, peer in cfg.peers.items():
        if peer.arch_args.get("dynamic_img_size") is False and len(cfg.views) > 1:
            raise ConfigError(f"peers.{name}.arch_args.dynamic_img_size=false: {peer.arch} is built for one view "
                              f"size and the views come in {len(cfg.views)} sizes; remove the setting (it is set "
                              f"to true for a plan of several sizes)")


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

"""Resolution: every `auto` and every default that depends on other keys, settled once for this machine before
anything is built (STYLE.md: resolve once, at the bottom). The run's config.yaml records what was settled.

Reads the registries (dogo.core.registry) for each method's defaults and each backbone's contract; imports nothing
above the config.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

from dogo.core.errors import ConfigError
from dogo.core.registry import BACKBONES, BACKENDS, METHODS, OBJECTIVES
from dogo.engine.config.loading import to_dict
from dogo.engine.config.schema import KNN_PROTOCOLS, AugmentConfig, Config, EvalConfig, RecipeOverrides, ViewGroup

# objective.tile=auto: the contrastive kernel's tile, in images
CPU_TILE = 1024  # on a CPU the tiles' launches are cheap next to their arithmetic
GPU_TILE_SHARE = 1 / 8  # of the free device memory, for the kernel's live blocks
GPU_TILE_RANGE = (1024, 32768)


def auto_tile(device: torch.device, peers: int, global_batch: int, crops: int = 2) -> int:
    """objective.tile=auto: on CUDA, the largest power of two whose live blocks (about four (crops tile x crops
    tile) fp32 blocks per peer, engine/run/memory.py) fit GPU_TILE_SHARE of the free memory, so that 16,384 views
    take a handful of tiles (each tile is tens of launches: small tiles are launch-bound); on CPUs, CPU_TILE. Never
    more than the global batch. crops: views per image of a peer (the plan's)."""
    if device.type != "cuda":
        return min(CPU_TILE, global_batch)
    free, _ = torch.cuda.mem_get_info(device)
    fitting = int((GPU_TILE_SHARE * free / (16 * crops ** 2 * max(peers, 1))) ** 0.5)
    tile = 1 << max(fitting, 1).bit_length() - 1
    return min(max(GPU_TILE_RANGE[0], min(tile, GPU_TILE_RANGE[1])), global_batch)


def resolve(cfg: Config) -> Config:
    """Settle every `auto` for this machine and each peer's method and temperature, in place. Idempotent: a
    resolved config (a run's config.yaml, a checkpoint's) comes back unchanged."""
    cfg.device = resolve_device(cfg.device)
    on_gpu = cfg.device == "cuda"
    _resolve_view_size(cfg, on_gpu)
    if on_gpu and cfg.objective.tile == "auto" and not torch.cuda.is_available():  # the tile needs the GPU's memory
        raise ConfigError("device=cuda but torch sees no CUDA device; use device=auto or device=cpu")
    if cfg.distributed.backend == "auto":
        cfg.distributed.backend = "nccl" if on_gpu else "gloo"
    if cfg.precision.dtype == "auto":
        cfg.precision.dtype = "bf16" if on_gpu else "fp32"  # bf16 is about 2x slower than fp32 on our CPUs
    if cfg.precision.channels_last == "auto":  # on a GPU, unless a peer's backbone gains nothing from it (a ViT)
        helps = all(BACKBONES.get(p.arch, f"peers.{n}.arch").channels_last for n, p in cfg.peers.items())
        cfg.precision.channels_last = "on" if on_gpu and helps else "off"
    if cfg.precision.cuda_graphs == "auto":
        cfg.precision.cuda_graphs = "off"  # until a GPU run shows the replayed step faster (docs/gpu.md)
    if cfg.augment.place == "auto":
        # on a GPU, batched on the device; on CPUs, per image in uint8 in the loader's workers, which is cheaper
        # there since the device is the same cores as the model
        cfg.augment.place = "device" if on_gpu else "workers"
    if cfg.objective.tile == "auto":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")
        crops = sum(g.count for g in cfg.views.values())
        cfg.objective.tile = auto_tile(device, len(cfg.peers), cfg.data.batch_size, crops)
    if cfg.log.tensorboard == "auto":
        cfg.log.tensorboard = "on" if tensorboard_installed() else "off"
    if cfg.checkpoint.resume == "auto":
        cfg.checkpoint.resume = "latest"
    if cfg.log.progress == "auto":
        cfg.log.progress = "on" if sys.stdout.isatty() else "off"
    _resolve_knn(cfg.eval)
    _resolve_dynamic_size(cfg)
    objective = OBJECTIVES.get(cfg.objective.name, "objective.name")
    methods = peer_methods(cfg)
    for name, peer in cfg.peers.items():
        if objective.method and peer.ssl not in (None, objective.method):
            raise ConfigError(f"peers.{name}.ssl={peer.ssl} conflicts with objective.name={objective.method}; "
                              f"peers with their own SSL methods train together under objective.name=dogo")
        peer.ssl = methods[name]
        method = METHODS.get(peer.ssl, f"peers.{name}.ssl")
        if peer.tau is None:
            peer.tau = method.default_tau
        hidden, out, layers = method.default_head
        peer.head_hidden = hidden if peer.head_hidden is None else peer.head_hidden
        peer.head_out = out if peer.head_out is None else peer.head_out
        peer.head_layers = layers if peer.head_layers is None else peer.head_layers
    return cfg


METHOD_SHAPED = ("tau", "head_hidden", "head_out", "head_layers")  # a peer's keys whose defaults are its method's


def peer_methods(cfg: Config) -> dict[str, str]:
    """The method each peer learns with: its own (peers.NAME.ssl), else the objective's, else simclr."""
    objective = OBJECTIVES.get(cfg.objective.name, "objective.name")
    return {name: peer.ssl or objective.method or "simclr" for name, peer in cfg.peers.items()}


def follow_method_switch(written: Config, cfg: Config, overrides: list[str]) -> list[str]:
    """A peer whose method the overrides changed (objective.name=vicreg, peers.NAME.ssl=byol) takes the new method's
    head and temperature, unless the overrides set them too: the file's were chosen for its own method (a 512-128
    SimCLR head is no VICReg expander). Changes `cfg` in place; returns a note per peer changed."""
    if list(written.peers) != list(cfg.peers):  # the overrides replaced the peers: nothing of the file's is left
        return []
    before, after = peer_methods(written), peer_methods(cfg)
    set_here = {o.partition("=")[0].strip() for o in overrides}
    notes = []
    for name, peer in cfg.peers.items():
        if before[name] == after[name]:
            continue
        reset = [k for k in METHOD_SHAPED if getattr(peer, k) is not None and f"peers.{name}.{k}" not in set_here]
        for key in reset:
            setattr(peer, key, None)
        if reset:
            notes.append(f"peers.{name} now learns with {after[name]} (the file: {before[name]}): its "
                         f"{', '.join(reset)} are {after[name]}'s defaults; set peers.{name}.<key>=... to choose")
    return notes


def view_size(side: int, on_gpu: bool) -> int:
    """data.image_size=auto for images whose median shorter side is `side` px: their own scale for small images
    (CIFAR's 32, STL's 96 -> 64), and for photos what a step affords: 224 on a GPU, 96 on a CPU."""
    if side <= 48:
        return 32
    if side <= 128:
        return 64
    return 224 if on_gpu else 96


def _resolve_view_size(cfg: Config, on_gpu: bool) -> None:
    """data.image_size, then what follows from it: augment.blur_p and each peer's cifar_stem (on a GPU for views up
    to 64 px; on a CPU the standard stem, which shrinks a 32 px view 4x before the blocks: ResNet-18's step is 10x
    faster there, 265 against 25 images/s on 2 cores, and learns within minutes where the stem's has not begun)."""
    if cfg.data.image_size == "auto":
        backend = BACKENDS.get(cfg.data.backend, "data.backend")
        cfg.data.image_size = view_size(backend.typical_side(cfg.data), on_gpu)
    if cfg.augment.blur_p == "auto":
        cfg.augment.blur_p = 0.0 if cfg.data.image_size <= 32 else 0.5
    for name, peer in cfg.peers.items():
        if peer.cifar_stem == "auto":
            has_stem = BACKBONES.get(peer.arch, f"peers.{name}.arch").cifar_stem
            peer.cifar_stem = has_stem and on_gpu and cfg.data.image_size <= 64


def group_size(group: ViewGroup, image_size: int) -> int:
    """A view group's side, px: its own, else data.image_size."""
    return image_size if group.size is None else group.size


def overlaid(recipe: AugmentConfig, overrides: RecipeOverrides) -> AugmentConfig:
    """`recipe` with the numbers `overrides` sets."""
    changes = {f.name: getattr(overrides, f.name) for f in dataclasses.fields(overrides)}
    return dataclasses.replace(recipe, **{k: v for k, v in changes.items() if v is not None})


def view_recipe(augment: AugmentConfig, group: ViewGroup, k: int) -> AugmentConfig:
    """The recipe of view k of a group: augment, then the group's overrides, then the view's own."""
    return overlaid(overlaid(augment, group.recipe), group.view_recipe.get(str(k), RecipeOverrides()))


def _resolve_dynamic_size(cfg: Config) -> None:
    """A backbone built for one view size (a timm ViT) takes views of several sizes only with timm's position
    embedding interpolated per input: arch_args.dynamic_img_size, set here when the plan has several sizes (an
    explicit false is refused by the checks)."""
    sizes = {group_size(g, cfg.data.image_size) for g in cfg.views.values()}
    if len(sizes) < 2:
        return
    for name, peer in cfg.peers.items():
        if BACKBONES.get(peer.arch, f"peers.{name}.arch").sized:
            peer.arch_args.setdefault("dynamic_img_size", True)


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


def tensorboard_installed() -> bool:
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

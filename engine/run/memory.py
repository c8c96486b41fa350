"""How much memory a training step needs on this rank, estimated before anything runs, against what the device has.

The estimate is the sum of
- what stays: the peers' parameters, gradients and optimiser state (DDP's gradient buckets when distributed), MoCo's
  key encoders and queues, the DisCo teacher, the training split where the data backend holds it on the device;
- the methods' d x d loss temporaries (VICReg, Barlow Twins) where they exceed the gradients, which they precede;
- what grows with the batch: the activations autograd saves for the backward pass, counted by running the peers'
  forward on the meta device (no memory, no compute) with a hook on every saved tensor, at the configured
  precision and memory format, plus the step's input views;
- the contrastive kernel: the gathered embeddings and their gradient, and a few (2 tile x 2 tile) blocks per peer;
- a working margin for the backward pass (gradients of the largest activations while they are alive);
- 15% on top of all that for the allocator's slack and library workspaces (measured on CPUs: the parts above came to
  0.83-0.87 of the resident-memory peak of a step; `tests/test_memory.py` holds the total within 25% of it).
It is linear in the per-rank batch but for the kernel, so the largest batch that fits is found by bisection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dogo.engine.config import Config
from dogo.core.environment import available_bytes
from dogo.core.errors import ConfigError
from dogo.core.precision import Precision
from dogo.core.registry import METHODS
from dogo.engine.ssl.momentum import module_bytes
from dogo.core.registry import OBJECTIVES
from dogo.engine.ssl.peers import PeerSet, build_peer
from dogo.models import build_backbone
from dogo.pipelines import held_bytes

_GIB = 1024 ** 3
ALLOCATOR_SLACK = 0.15  # share added for allocator slack and library workspaces
NEAR = 0.85  # an estimate above this share of the available memory gets a warning


@dataclass
class MemoryEstimate:
    parts: dict[str, int]  # bytes per part

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{k} {v / _GIB:.2f}" for k, v in self.parts.items() if v) + " GiB"


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _meta_peers(cfg: Config, precision: Precision) -> PeerSet:
    """The run's peers on the meta device (no memory), in the dtype autocast keeps activations in."""
    with torch.device("meta"):
        model = PeerSet(cfg)
    if precision.dtype != torch.float32:
        model.to(precision.dtype)
    return model.to(memory_format=precision.memory_format).train()


def _saved_bytes(model, local_batch: int, precision: Precision) -> tuple[int, int]:
    """(bytes autograd saves in the meta peers' forward for `local_batch` images, the largest single saved tensor),
    every group of the plan of views at its size. Low precision adds the low-precision weight copies autocast
    saves."""
    dtype, fmt = precision.dtype, precision.memory_format
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        key = t.untyped_storage()._cdata
        if key not in weights:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    groups = [torch.empty(len(g.views) * local_batch, 3, g.size, g.size, device="meta", dtype=dtype)
              .contiguous(memory_format=fmt) for g in model.plan.groups]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(groups)
    extra = _param_bytes(model) if dtype != torch.float32 else 0  # autocast's bf16/fp16 weight copies
    return sum(seen.values()) + extra, max(seen.values(), default=0)


def _optimizer_state_factor(cfg: Config) -> int:
    return {"lars": 1, "sgd": 1, "adamw": 2}[cfg.optim.name]  # momentum; Adam's two moments


def _kernel_bytes(cfg: Config, global_batch: int) -> int:
    """The tiled contrastive kernel: normalised gathered embeddings of every crop (and their gradient) for each
    peer in it, and about four live (V tile x V tile) fp32 blocks per peer during the walk (V crops per image)."""
    peers = len(cfg.peers)
    d = max(p.head_out for p in cfg.peers.values())
    crops = sum(g.count for g in cfg.views.values())
    tile = min(cfg.objective.tile, global_batch)  # resolved for the device by the config
    return peers * (2 * crops * global_batch * d * 4 + 4 * (crops * tile) ** 2 * 4)


@dataclass
class MemoryModel:
    """The estimate as a function of the global batch: fixed parts, and per-image parts of the local batch."""
    cfg: Config
    world_size: int
    fixed: dict[str, int]
    activations_at_2: int  # saved bytes at 2 images per rank
    activations_per_image: float
    largest_per_image: float  # the largest saved tensor, per image
    view_bytes_per_image: int
    loss_bytes_per_image: int  # what the methods' losses hold per image beyond the peers' forward (DINO's scores)

    def at(self, global_batch: int) -> MemoryEstimate:
        local = max(1, global_batch // self.world_size)
        parts = {
            **self.fixed,
            "activations": int(self.activations_at_2 + self.activations_per_image * (local - 2)),
            "views": self.view_bytes_per_image * local,
            "method scores": self.loss_bytes_per_image * local,
            "loss kernel": _kernel_bytes(self.cfg, global_batch),
            "backward margin": int(2 * self.largest_per_image * local),  # gradients of the largest activations
        }
        parts["allocator and workspaces"] = int(ALLOCATOR_SLACK * sum(parts.values()))
        return MemoryEstimate(parts)

    def largest_batch(self, limit: int) -> int:
        """The largest global batch (a multiple of the world size) whose estimate fits `limit` bytes; 0 if none."""
        lo, hi = 0, max(1, self.cfg.data.batch_size // self.world_size)
        while self.at(hi * self.world_size).total <= limit:  # the config's batch may be far below the limit
            lo, hi = hi, 2 * hi
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.at(mid * self.world_size).total <= limit else (lo, mid - 1)
        return lo * self.world_size


def _require_image_size(model: PeerSet, cfg: Config, precision: Precision) -> None:
    """Every peer's backbone takes views of each size of the plan (a ViT's patches, inception's stem need a least
    size): one meta forward each (no memory, no compute), so that the one that cannot is named with what to do rather
    than a convolution's traceback from the trial forward below."""
    for g, group in enumerate(model.plan.groups):
        s = group.size
        key = "data.image_size" if g == 0 else f"views.{group.name}.size"
        for name, peer in model.peers.items():
            views = torch.empty(2, 3, s, s, device="meta", dtype=precision.dtype).contiguous(
                memory_format=precision.memory_format)
            try:
                with torch.no_grad():
                    peer.backbone(views)
            except (RuntimeError, ValueError, AssertionError) as exc:
                reason = " ".join(str(exc).split("\n")[0].split())[:200]
                raise ConfigError(f"peers.{name}.arch={cfg.peers[name].arch} cannot take {key}={s} px views "
                                  f"({reason}); raise {key}, or give peers.{name}.arch a backbone (or arch_args, "
                                  f"e.g. a ViT's patch_size) made for {s} px images") from None


def memory_model(cfg: Config, world_size: int, precision: Precision) -> MemoryModel:
    model = _meta_peers(cfg, precision)
    _require_image_size(model, cfg, precision)
    params = sum(p.numel() for p in model.parameters()) * 4  # fp32 master weights whatever the autocast dtype
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point()) * 4
    # the per-image part from two batch sizes (the heads' BatchNorm1d needs at least 2 rows)
    saved_2, _ = _saved_bytes(model, 2, precision)
    saved_4, largest_4 = _saved_bytes(model, 4, precision)
    elem = torch.finfo(precision.dtype).bits // 8
    fixed = {
        "parameters": params + buffers,
        "gradients": params * (2 if world_size > 1 else 1),  # DDP keeps its own gradient buckets
        "optimizer": params * _optimizer_state_factor(cfg),
        "targets": _target_bytes(cfg),
        "method losses": _method_loss_bytes(cfg, params, world_size),
        "held images": held_bytes(cfg.data),  # every rank holds the whole split
    }
    view_bytes = sum(len(g.views) * 3 * g.size ** 2 * elem for g in model.plan.groups)  # per image
    scores = sum(METHODS.get(p.ssl, f"peers.{n}.ssl").loss_bytes_per_image(p, model.plan.crops, model.plan.large)
                 for n, p in cfg.peers.items())
    return MemoryModel(cfg, world_size, fixed, saved_2, (saved_4 - saved_2) / 2, largest_4 / 4, view_bytes, scores)


def _method_loss_bytes(cfg: Config, params: int, world_size: int) -> int:
    """The methods' d x d loss temporaries (VICReg's covariances, Barlow Twins' cross-correlation) beyond the step's
    gradients: they are alive in the loss's forward and backward, before any parameter gradient of the step exists,
    and on one rank the previous step's gradients are freed first (zero_grad(set_to_none=True)), so the two never
    coexist. DDP's gradient buckets stay allocated: there they add up."""
    loss_bytes = sum(METHODS.get(p.ssl, f"peers.{n}.ssl").loss_bytes(p) for n, p in cfg.peers.items())
    return loss_bytes if world_size > 1 else max(0, loss_bytes - params)


def estimate(cfg: Config, world_size: int, precision: Precision) -> MemoryEstimate:
    """Bytes this rank needs for a training step of `cfg` at its batch size."""
    return memory_model(cfg, world_size, precision).at(cfg.data.batch_size)


def _target_bytes(cfg: Config) -> int:
    """What the peers' methods keep (a momentum encoder: a copy of the peer; a queue), and the DisCo teacher (its
    backbone, when its architecture is named); all in fp32."""
    total = 0
    for name, p in cfg.peers.items():
        method = METHODS.get(p.ssl, f"peers.{name}.ssl")
        with torch.device("meta"):
            peer = build_peer(p, cfg.data.image_size)
        total += method.state_bytes(p, peer)
    if OBJECTIVES.get(cfg.objective.name, "objective.name").uses_teacher and cfg.teacher.arch:
        with torch.device("meta"):
            backbone, _ = build_backbone(cfg.teacher.arch, cfg.teacher.cifar_stem, key="teacher.arch",
                                         image_size=cfg.data.image_size, arch_args=cfg.teacher.arch_args)
        total += module_bytes(backbone)
    return total


def check_fits(cfg: Config, world_size: int, device: torch.device, precision: Precision
               ) -> tuple[MemoryEstimate, int, str | None]:
    """(estimate, available bytes, a warning or None); raises ConfigError with the estimate, the limit and the
    settings that would fit when the step cannot fit on this rank."""
    model = memory_model(cfg, world_size, precision)
    est = model.at(cfg.data.batch_size)
    limit = available_bytes(device)
    where = "GPU" if device.type == "cuda" else "CPU"
    need = (f"a training step needs about {est.total / _GIB:.1f} GiB per rank ({est.describe()}) and this "
            f"{where} has {limit / _GIB:.1f} GiB available")
    if est.total > limit:
        fits = model.largest_batch(limit)
        advice = (f"lower data.batch_size to at most {fits} (now {cfg.data.batch_size}, over {world_size} rank(s))"
                  if fits else "even 1 image per rank does not fit: use a smaller model or image size")
        kernel = est.parts["loss kernel"]
        if kernel > 0.25 * est.total:
            advice += f", or objective.tile (now {cfg.objective.tile}: the loss kernel takes {kernel / _GIB:.1f} GiB)"
        raise ConfigError(f"{need}: {advice}")
    warning = f"memory: {need} (over {int(NEAR * 100)}%: close to the limit)" if est.total > NEAR * limit else None
    return est, limit, warning

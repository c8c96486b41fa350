"""The SSL methods a peer learns with (`peers.NAME.ssl`), registered in dogo.core.registry.METHODS.

A method is one class. Its settings, if it has any, are the peer's config sub-section named after it (declared in
engine/config/schema.py, e.g. peers.r18.mocov2). It declares the projection head and predictor it wants on the peer, what it keeps across steps (its
state: a momentum encoder, a queue of negatives; built by `make_state`, updated by the trainer's hooks, counted by
`state_bytes`), its default temperature, which of the peer's embeddings enter DoGo's KL, and its own loss. The config,
the peers, the memory estimate and the objectives ask the method; none of them compares method names.

A peer's outputs are (z1, z2): its projections of both views, (b, d) each, unnormalised; a method with a predictor
adds (p1, p2).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

from dogo.engine.dist.distributed import all_gather_rows
from dogo.core.errors import ConfigError
from dogo.core.registry import METHODS
from dogo.engine.config.schema import BYOLSettings, MoCoV2Settings
from dogo.engine.ssl import losses
from dogo.engine.ssl.momentum import KeyQueue, MomentumEncoder, module_bytes, momentum_at
from dogo.models import projection_head


class MethodState(nn.Module):
    """What a method keeps across steps for one peer. The trainer calls `schedule` on the host before each step,
    `targets` under the run's autocast before the loss and `after_step` once the peers are updated; its state_dict
    goes into checkpoints.

    `targets` and `after_step` are part of the step a CUDA graph may capture (precision.cuda_graphs): they read
    what changes from step to step (a scheduled momentum, the queue's position) from device tensors and update
    their state in place; only `schedule` sees the step number."""

    def schedule(self, step: int, total_steps: int) -> None:
        """Write the numbers of the step that makes `step` steps in all (a momentum) where the step reads them."""

    def targets(self, v1: torch.Tensor, v2: torch.Tensor) -> Any:
        raise NotImplementedError

    def after_step(self, peer: nn.Module, targets: Any) -> None:
        raise NotImplementedError


class Method:
    name: ClassVar[str]
    structural: ClassVar[tuple[str, ...]] = ()  # settings that shape tensors: a resume may not change them
    default_tau: ClassVar[float | None] = None  # NT-Xent / InfoNCE temperature when peers.NAME.tau is empty
    # the projection head when peers.NAME.head_* are empty: (hidden, out, Linear layers), as the method's paper
    default_head: ClassVar[tuple[int, int, int]] = (2048, 128, 2)
    contrastive: ClassVar[bool] = False  # NT-Xent over the (all-gathered) batch: computed by the tiled kernel
    whitened_projection: ClassVar[bool] = False  # the projection ends in a BN without affine parameters (SimSiam)
    projection_bias: ClassVar[bool] = True  # the head's last Linear has a bias
    kl_on_predictions: ClassVar[bool] = False  # DoGo's KL takes its predictions (SimSiam, BYOL): kl_embeddings

    def check(self, key: str, peer, cfg) -> None:
        """Raise ConfigError for settings of this peer (`key`: peers.NAME) that the method cannot use."""

    def predictor(self, peer) -> nn.Module | None:
        """The prediction head on the peer's projection, if the method has one (trained with the peer)."""
        return None

    def make_state(self, peer_cfg, peer: nn.Module, seed: int) -> MethodState | None:
        """Its state for one peer, built from the peer at its initial weights; None when it keeps none."""
        return None

    def state_bytes(self, peer_cfg, peer: nn.Module) -> int:
        """Bytes its state takes for this peer (`peer` may live on the meta device)."""
        return 0

    def loss_bytes(self, peer_cfg) -> int:
        """Bytes its own loss holds at its peak beyond the embeddings (e.g. a d x d matrix and its gradient)."""
        return 0

    def loss(self, name: str, out: tuple[torch.Tensor, ...], peer, targets: Any) -> dict[str, torch.Tensor]:
        """The method's own terms outside the tiled kernel, named f'{name}/...'; `targets`: its state's targets."""
        return {}

    def kl_embeddings(self, out: tuple[torch.Tensor, ...], partner: "Method") -> tuple[tuple, tuple]:
        """(own, as_target): the two views' embeddings from which DoGo's KL takes this peer's own similarity
        distribution and the one its partner is pulled towards.

        Projections for both, for a method without a predictor. With a predictor (SimSiam, BYOL), as DoGo's code
        does for SimSiam (util/train_util.py): its predictions for both; but beside another method with a predictor
        (the pairing DoGo's code defines for two SimSiam peers), the partner is pulled towards its projections."""
        if not self.kl_on_predictions:
            return out[:2], out[:2]
        predictions = (out[2], out[3])
        return predictions, (out[:2] if partner.kl_on_predictions else predictions)


class SimCLR(Method):
    """NT-Xent over the global batch (SimCLR); the tiled kernel computes it, with DoGo's KL in the same walk."""
    name = "simclr"
    default_tau = 0.1  # SimCLR's ImageNet temperature
    contrastive = True


class MoCoState(MethodState):
    """MoCo's key encoder and queue. Targets: (k1, k2, negatives); k1 is None in MoCo's own one-direction form,
    which needs view 2's keys only."""

    def __init__(self, peer: nn.Module, settings: MoCoV2Settings, dim: int, seed: int):
        super().__init__()
        self.settings = settings
        self.key_encoder = MomentumEncoder(peer, settings.momentum)
        self.queue = KeyQueue(settings.queue_size, dim, seed)

    def schedule(self, step, total_steps):
        s = self.settings
        self.key_encoder.set_momentum(momentum_at(s.momentum, s.momentum_schedule, step, total_steps))

    def targets(self, v1, v2):
        if not self.settings.symmetric:
            return None, self.key_encoder.embed(v2), self.queue.negatives()
        k1, k2 = self.key_encoder.embed(torch.cat([v1, v2])).chunk(2)  # one forward for both views
        return k1, k2, self.queue.negatives()

    def after_step(self, peer, targets):
        """Enqueue every rank's keys (MoCo: view 2's; both views' in the symmetric form), then follow the peer."""
        keys = [k for k in targets[:2] if k is not None]
        gathered = all_gather_rows(torch.cat(keys, dim=1))  # one collective for both views
        self.queue.enqueue(torch.cat(gathered.chunk(len(keys), dim=1)))  # every rank's view-1 keys, then view-2's
        self.key_encoder.follow(peer)


class MoCoV2(Method):
    """InfoNCE of view-1 queries against the momentum encoder's view-2 keys and a queue of earlier keys (MoCo v2);
    with peers.NAME.mocov2.symmetric both directions, averaged."""
    name = "mocov2"
    structural = ("queue_size",)
    default_tau = 0.2  # MoCo v2's

    def check(self, key: str, peer, cfg) -> None:
        s = peer.mocov2
        if not 0 <= s.momentum < 1:
            raise ConfigError(f"{key}.mocov2.momentum must be in [0, 1), got {s.momentum}")
        per_step = (2 if s.symmetric else 1) * cfg.data.batch_size
        if s.queue_size < per_step:
            raise ConfigError(f"{key}.mocov2.queue_size={s.queue_size} holds less than one step's keys ({per_step}); "
                              f"make it larger")

    def make_state(self, peer_cfg, peer, seed):
        return MoCoState(peer, peer_cfg.mocov2, peer_cfg.head_out, seed)

    def state_bytes(self, peer_cfg, peer):
        return module_bytes(peer) + peer_cfg.mocov2.queue_size * peer_cfg.head_out * 4

    def loss(self, name, out, peer, targets):
        k1, k2, queue = targets
        q1, q2 = losses.normalize(out[0]), losses.normalize(out[1])
        return {f"{name}/infonce": losses.mocov2_loss(q1, q2, k1, k2, queue, peer.tau, peer.mocov2.symmetric)}


class SimSiam(Method):
    """Negative cosine between each view's prediction and the other view's projection behind a stop-gradient."""
    name = "simsiam"
    structural = ("pred_hidden",)
    whitened_projection = True
    kl_on_predictions = True

    def check(self, key, peer, cfg):
        if peer.simsiam.pred_hidden <= 0:
            raise ConfigError(f"{key}.simsiam.pred_hidden must be positive, got {peer.simsiam.pred_hidden}")

    def predictor(self, peer):
        return projection_head(peer.head_out, peer.simsiam.pred_hidden, peer.head_out)

    def loss(self, name, out, peer, targets):
        return {f"{name}/simsiam": losses.simsiam_loss(*(losses.at_least_fp32(x) for x in out))}


class BYOLState(MethodState):
    """BYOL's target network: an EMA copy of the peer's backbone and projection. Targets: its L2-normalised
    projections of both views (one forward)."""

    def __init__(self, peer: nn.Module, settings: BYOLSettings):
        super().__init__()
        self.settings = settings
        self.target = MomentumEncoder(peer, settings.momentum)

    def schedule(self, step, total_steps):
        s = self.settings
        self.target.set_momentum(momentum_at(s.momentum, s.momentum_schedule, step, total_steps))

    def targets(self, v1, v2):
        return self.target.embed(torch.cat([v1, v2])).chunk(2)

    def after_step(self, peer, targets):
        self.target.follow(peer)


class BYOL(Method):
    """Each view's prediction regresses the target network's projection of the other view (2 - 2 cos, both
    directions summed, as BYOL's loss); the target network follows the peer by EMA."""
    name = "byol"
    structural = ("pred_hidden",)
    default_head = (4096, 256, 2)
    kl_on_predictions = True

    def check(self, key, peer, cfg):
        s = peer.byol
        if not 0 <= s.momentum < 1:
            raise ConfigError(f"{key}.byol.momentum must be in [0, 1), got {s.momentum}")
        if s.pred_hidden <= 0:
            raise ConfigError(f"{key}.byol.pred_hidden must be positive, got {s.pred_hidden}")

    def predictor(self, peer):
        return projection_head(peer.head_out, peer.byol.pred_hidden, peer.head_out)

    def make_state(self, peer_cfg, peer, seed):
        return BYOLState(peer, peer_cfg.byol)

    def state_bytes(self, peer_cfg, peer):
        predictor = peer.predictor
        return module_bytes(peer) - (module_bytes(predictor) if predictor is not None else 0)

    def loss(self, name, out, peer, targets):
        t1, t2 = targets
        p1, p2 = losses.at_least_fp32(out[2]), losses.at_least_fp32(out[3])
        return {f"{name}/byol": losses.byol_loss(p1, p2, t1, t2)}


class VICReg(Method):
    """Variance-invariance-covariance regularisation; variance and covariance over the global batch (every rank's
    embeddings gathered with their gradient), the invariance over this rank's rows (DDP's averaging makes it the
    global mean)."""
    name = "vicreg"
    default_head = (8192, 8192, 3)
    projection_bias = False

    def check(self, key, peer, cfg):
        s = peer.vicreg
        for k in ("sim_coeff", "std_coeff", "cov_coeff"):
            if getattr(s, k) < 0:
                raise ConfigError(f"{key}.vicreg.{k} must be 0 or more, got {getattr(s, k)}")
        if s.eps <= 0:
            raise ConfigError(f"{key}.vicreg.eps must be positive, got {s.eps}")
        if cfg.data.batch_size < 2:
            raise ConfigError(f"{key}: vicreg needs a global batch of at least 2 images for its variance")

    def loss_bytes(self, peer_cfg):
        return 6 * peer_cfg.head_out ** 2 * 4  # fp32 covariances, squares and gradients: 6.1-6.4 d^2 measured on CPU

    def loss(self, name, out, peer, targets):
        s = peer.vicreg
        z1, z2 = losses.at_least_fp32(out[0]), losses.at_least_fp32(out[1])
        return {f"{name}/vicreg": losses.vicreg_loss(z1, z2, s.sim_coeff, s.std_coeff, s.cov_coeff, s.eps)}


class BarlowTwins(Method):
    """The cross-correlation of the two views' embeddings, each normalised over the global batch (every rank's
    embeddings gathered with their gradient), pulled towards the identity."""
    name = "barlowtwins"
    default_head = (8192, 8192, 3)
    projection_bias = False

    def check(self, key, peer, cfg):
        if peer.barlowtwins.lambd < 0:
            raise ConfigError(f"{key}.barlowtwins.lambd must be 0 or more, got {peer.barlowtwins.lambd}")
        if cfg.data.batch_size < 2:
            raise ConfigError(f"{key}: barlowtwins needs a global batch of at least 2 images to normalise over")

    def loss_bytes(self, peer_cfg):
        return 5 * peer_cfg.head_out ** 2 * 4  # the fp32 cross-correlation, its square and gradients: 5.1-5.3 d^2

    def loss(self, name, out, peer, targets):
        z1, z2 = losses.at_least_fp32(out[0]), losses.at_least_fp32(out[1])
        return {f"{name}/barlowtwins": losses.barlow_twins_loss(z1, z2, peer.barlowtwins.lambd)}


for _method in (SimCLR, MoCoV2, SimSiam, BYOL, VICReg, BarlowTwins):
    METHODS.register(_method.name, _method())

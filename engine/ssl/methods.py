"""The SSL methods a peer learns with (`peers.NAME.ssl`), registered in dogo.core.registry.METHODS.

A method is one class. Its settings, if it has any, are the peer's config sub-section named after it (declared in
engine/config/schema.py, e.g. peers.r18.mocov2). It declares the projection head and predictor it wants on the peer, what it keeps across steps (its
state: a momentum encoder, a queue of negatives; built by `make_state`, updated by the trainer's hooks, counted by
`state_bytes`), its default temperature, which of the peer's embeddings enter DoGo's KL, and its own loss. The config,
the peers, the memory estimate and the objectives ask the method; none of them compares method names.

A peer's outputs are its Crops (engine/ssl/peers.py): its projections of every crop of its images, large crops first,
unnormalised; a method with a predictor has its predictions too. Two views are the two-crop case; every loss here is
written for crops, as solo-learn's: a method whose loss takes only the two large crops (SimSiam, VICReg, Barlow
Twins, MoCo alone) says so (`local_crops`), and its momentum networks see the large crops only.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

from dogo.engine.dist.distributed import all_gather_rows
from dogo.engine.dist.syncbn import convert_sync_batchnorm
from dogo.core.errors import ConfigError
from dogo.core.registry import METHODS
from dogo.engine.config.schema import BYOLSettings, DINOSettings, MoCoV2Settings
from dogo.engine.ssl import losses
from dogo.engine.ssl.momentum import (KeyQueue, MomentumEncoder, centred_softmax, follow_centre, module_bytes,
                                      momentum_at)
from dogo.engine.ssl.peers import Crops
from dogo.models import Prototypes, projection_head


class MethodState(nn.Module):
    """What a method keeps across steps for one peer. The trainer calls `schedule` on the host before each step,
    `targets` under the run's autocast before the loss and `after_step` once the peers are updated; its state_dict
    goes into checkpoints.

    `targets` and `after_step` are part of the step a CUDA graph may capture (precision.cuda_graphs): they read
    what changes from step to step (a scheduled momentum, the queue's position) from device tensors and update
    their state in place; only `schedule` sees the step number."""

    def schedule(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Write the numbers of the step that makes `step` steps in all (a momentum) where the step reads them."""

    @property
    def eager_steps(self) -> int:
        """Steps (from the start of the run) whose device work differs from the later ones' by a host decision
        (DINO's frozen last layer): a CUDA graph is captured only after them."""
        return 0

    def before_update(self, peer: nn.Module) -> None:
        """Between the backward and the optimiser step (DINO drops its last layer's gradients in its first epoch)."""

    def sync_batchnorm(self) -> None:
        """Under distributed.sync_bn on several ranks. By default the state's networks keep each rank's batch
        statistics (MoCo's keys: no BN leak between queries and keys; BYOL's target network); DINO syncs its
        teacher's, as DINO's code."""

    def targets(self, large: torch.Tensor, crops: int) -> Any:
        """large: the peer's `crops` large crops of its images, (crops * b, 3, S, S), crop after crop."""
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
    head_style: ClassVar[str] = "simclr"  # the head's blocks: Linear-BN-ReLU, or dino's Linear-GELU (models/heads.py)
    kl_on_predictions: ClassVar[bool] = False  # DoGo's KL takes its predictions (SimSiam, BYOL): kl_embeddings
    # its own loss uses the crops beyond the two large ones (solo-learn's: SimCLR, BYOL); False: the two large crops
    # only, so that alone it refuses local crops (under DoGo or DisCo the KL or the distillation uses them)
    local_crops: ClassVar[bool] = True

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

    def loss_bytes_per_image(self, peer_cfg, crops: int, large: int) -> int:
        """Bytes its loss and targets hold per image of the local batch beyond what the peer's forward saves (with
        `crops` crops per image, `large` of them large)."""
        return 0

    def loss(self, name: str, out: Crops, peer, targets: Any) -> dict[str, torch.Tensor]:
        """The method's own terms outside the tiled kernel, named f'{name}/...'; `targets`: its state's targets."""
        return {}

    def kl_embeddings(self, out: Crops, partner: "Method") -> tuple[torch.Tensor, torch.Tensor]:
        """(own, as_target): the flat embeddings of every crop from which DoGo's KL takes this peer's own
        similarity distribution and the one its partner is pulled towards.

        Projections for both, for a method without a predictor. With a predictor (SimSiam, BYOL), as DoGo's code
        does for SimSiam (util/train_util.py): its predictions for both; but beside another method with a predictor
        (the pairing DoGo's code defines for two SimSiam peers), the partner is pulled towards its projections."""
        if not self.kl_on_predictions:
            return out.z, out.z
        return out.p, (out.z if partner.kl_on_predictions else out.p)


class SimCLR(Method):
    """NT-Xent over the global batch (SimCLR); the tiled kernel computes it, with DoGo's KL in the same walk."""
    name = "simclr"
    default_tau = 0.1  # SimCLR's ImageNet temperature
    contrastive = True


class MoCoState(MethodState):
    """MoCo's key encoder and queue. Targets: (k_0, ..., k_{G-1}, negatives), the keys of the G large crops; in
    MoCo's own one-direction form only crop 1's are made (the others None); the symmetric form makes all of
    them in one forward."""

    def __init__(self, peer: nn.Module, settings: MoCoV2Settings, dim: int, seed: int):
        super().__init__()
        self.settings = settings
        self.key_encoder = MomentumEncoder(peer, settings.momentum)
        self.queue = KeyQueue(settings.queue_size, dim, seed)

    def schedule(self, step, total_steps, steps_per_epoch):
        s = self.settings
        self.key_encoder.set_momentum(momentum_at(s.momentum, s.momentum_schedule, step, total_steps))

    def targets(self, large, crops):
        if not self.settings.symmetric:
            return None, self.key_encoder.embed(large.chunk(crops)[1]), *[None] * (crops - 2), self.queue.negatives()
        return *self.key_encoder.embed(large).chunk(crops), self.queue.negatives()  # one forward for every crop

    def after_step(self, peer, targets):
        """Enqueue every rank's keys (MoCo: crop 1's; every large crop's in the symmetric form), then follow the
        peer."""
        keys = [k for k in targets[:-1] if k is not None]
        gathered = all_gather_rows(torch.cat(keys, dim=1))  # one collective for every crop
        self.queue.enqueue(torch.cat(gathered.chunk(len(keys), dim=1)))  # every rank's crop-0 keys, then crop 1's
        self.key_encoder.follow(peer)


class MoCoV2(Method):
    """InfoNCE of crop-0 queries against the momentum encoder's crop-1 keys and a queue of earlier keys (MoCo v2);
    with peers.NAME.mocov2.symmetric every large crop's keys, each queried by the other crops, averaged. Keys come
    from the large crops only; alone it trains on the two large crops (solo-learn's MoCo v2+)."""
    name = "mocov2"
    structural = ("queue_size",)
    default_tau = 0.2  # MoCo v2's
    local_crops = False

    def check(self, key: str, peer, cfg) -> None:
        s = peer.mocov2
        if not 0 <= s.momentum < 1:
            raise ConfigError(f"{key}.mocov2.momentum must be in [0, 1), got {s.momentum}")
        large = next(iter(cfg.views.values())).count
        per_step = (large if s.symmetric else 1) * cfg.data.batch_size
        if s.queue_size < per_step:
            raise ConfigError(f"{key}.mocov2.queue_size={s.queue_size} holds less than one step's keys ({per_step}); "
                              f"make it larger")

    def make_state(self, peer_cfg, peer, seed):
        return MoCoState(peer, peer_cfg.mocov2, peer_cfg.head_out, seed)

    def state_bytes(self, peer_cfg, peer):
        return module_bytes(peer) + peer_cfg.mocov2.queue_size * peer_cfg.head_out * 4

    def loss(self, name, out, peer, targets):
        *keys, queue = targets
        queries = [losses.normalize(q) for q in out.split(out.z)]
        return {f"{name}/infonce": losses.mocov2_loss(queries, keys, queue, peer.tau)}


class SimSiam(Method):
    """Negative cosine between each view's prediction and the other view's projection behind a stop-gradient; the
    two large crops only (solo-learn's SimSiam)."""
    name = "simsiam"
    structural = ("pred_hidden",)
    whitened_projection = True
    kl_on_predictions = True
    local_crops = False

    def check(self, key, peer, cfg):
        if peer.simsiam.pred_hidden <= 0:
            raise ConfigError(f"{key}.simsiam.pred_hidden must be positive, got {peer.simsiam.pred_hidden}")

    def predictor(self, peer):
        return projection_head(peer.head_out, peer.simsiam.pred_hidden, peer.head_out)

    def loss(self, name, out, peer, targets):
        z, p = out.split(out.z), out.split(out.p)
        return {f"{name}/simsiam": losses.simsiam_loss(*(losses.at_least_fp32(x) for x in (*z[:2], *p[:2])))}


class BYOLState(MethodState):
    """BYOL's target network: an EMA copy of the peer's backbone and projection. Targets: its L2-normalised
    projections of the large crops (one forward), one tensor per crop."""

    def __init__(self, peer: nn.Module, settings: BYOLSettings):
        super().__init__()
        self.settings = settings
        self.target = MomentumEncoder(peer, settings.momentum)

    def schedule(self, step, total_steps, steps_per_epoch):
        s = self.settings
        self.target.set_momentum(momentum_at(s.momentum, s.momentum_schedule, step, total_steps))

    def targets(self, large, crops):
        return self.target.embed(large).chunk(crops)

    def after_step(self, peer, targets):
        self.target.follow(peer)


class BYOL(Method):
    """Each crop's prediction regresses the target network's projection of every other large crop (2 - 2 cos,
    summed over the pairs as BYOL's loss over its two directions and solo-learn's over crops); the target network
    sees the large crops only and follows the peer by EMA."""
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
        predictions = out.split(losses.at_least_fp32(out.p))
        return {f"{name}/byol": losses.byol_loss(predictions, targets)}


class VICReg(Method):
    """Variance-invariance-covariance regularisation of the two large crops (solo-learn's VICReg); variance and
    covariance over the global batch (every rank's embeddings gathered with their gradient), the invariance over this
    rank's rows (DDP's averaging makes it the global mean)."""
    name = "vicreg"
    default_head = (8192, 8192, 3)
    projection_bias = False
    local_crops = False

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
        z1, z2 = out.split(losses.at_least_fp32(out.z))[:2]
        return {f"{name}/vicreg": losses.vicreg_loss(z1, z2, s.sim_coeff, s.std_coeff, s.cov_coeff, s.eps)}


class BarlowTwins(Method):
    """The cross-correlation of the two large crops' embeddings, each normalised over the global batch (every rank's
    embeddings gathered with their gradient), pulled towards the identity (solo-learn's Barlow Twins)."""
    name = "barlowtwins"
    default_head = (8192, 8192, 3)
    projection_bias = False
    local_crops = False

    def check(self, key, peer, cfg):
        if peer.barlowtwins.lambd < 0:
            raise ConfigError(f"{key}.barlowtwins.lambd must be 0 or more, got {peer.barlowtwins.lambd}")
        if cfg.data.batch_size < 2:
            raise ConfigError(f"{key}: barlowtwins needs a global batch of at least 2 images to normalise over")

    def loss_bytes(self, peer_cfg):
        return 5 * peer_cfg.head_out ** 2 * 4  # the fp32 cross-correlation, its square and gradients: 5.1-5.3 d^2

    def loss(self, name, out, peer, targets):
        z1, z2 = out.split(losses.at_least_fp32(out.z))[:2]
        return {f"{name}/barlowtwins": losses.barlow_twins_loss(z1, z2, peer.barlowtwins.lambd)}


class DINOState(MethodState):
    """DINO's teacher: an EMA copy of the peer with its prototypes, the centre of its outputs, its temperature.

    Targets: (probs_0, ..., probs_{G-1}, logits): the teacher's softmax((t - centre) / teacher_temp) over the
    prototypes for each of the G large crops, and its raw scores, from which `after_step` moves the centre (their
    mean over every rank's images and large crops, as DINO's update_center) before the teacher follows the peer.
    The momentum and the temperature of the step live in device tensors (a CUDA graph replays them); whether the last
    layer is frozen is decided on the host, so the trainer captures no graph before that phase ends (eager_steps)."""

    def __init__(self, peer: nn.Module, settings: DINOSettings):
        super().__init__()
        self.settings = settings
        self.teacher = MomentumEncoder(peer, settings.momentum, keep_predictor=True)
        self.register_buffer("center", torch.zeros(1, settings.prototypes))
        self.register_buffer("teacher_temp", torch.tensor(settings.warmup_teacher_temp), persistent=False)
        self.frozen = settings.freeze_last_layer_epochs > 0
        self._eager_steps = 0

    def schedule(self, step, total_steps, steps_per_epoch):
        s = self.settings
        self.teacher.set_momentum(momentum_at(s.momentum, s.momentum_schedule, step, total_steps))
        epoch = (step - 1) // steps_per_epoch  # of the step being made (step counts from 1)
        self.teacher_temp.fill_(teacher_temp_at(s, epoch))
        self.frozen = epoch < s.freeze_last_layer_epochs
        self._eager_steps = s.freeze_last_layer_epochs * steps_per_epoch

    @property
    def eager_steps(self):
        return self._eager_steps

    @torch.no_grad()
    def targets(self, large, crops):
        encoder = self.teacher.encoder
        logits = losses.at_least_fp32(encoder.predictor(encoder(large)))
        return *centred_softmax(logits, self.center, self.teacher_temp).chunk(crops), logits

    def sync_batchnorm(self):
        convert_sync_batchnorm(self.teacher.encoder)  # in place: the same parameters and buffers

    def before_update(self, peer):
        if self.frozen:  # DINO's cancel_gradients_last_layer: no gradient, so the optimiser leaves it untouched
            for p in peer.predictor.parameters():
                p.grad = None

    @torch.no_grad()
    def after_step(self, peer, targets):
        follow_centre(self.center, targets[-1], self.settings.center_momentum)
        self.teacher.follow(peer)


def teacher_temp_at(s: DINOSettings, epoch: int) -> float:
    """DINO's teacher temperature: linear from warmup_teacher_temp to teacher_temp over the warm-up epochs (one value
    per epoch, as DINO's np.linspace schedule and lightly's), then teacher_temp."""
    n = s.warmup_teacher_temp_epochs
    if epoch >= n:
        return s.teacher_temp
    return s.warmup_teacher_temp + (s.teacher_temp - s.warmup_teacher_temp) * epoch / max(1, n - 1)


class DINO(Method):
    """Self-distillation without labels (DINO): the student's softmax over K prototypes for every crop pulled
    towards a momentum teacher's centred, sharpened softmax for every other large crop. The peer's head is DINO's
    MLP to a bottleneck (its embedding: what DoGo's KL and the kNN see), its predictor the weight-normalised
    prototypes; the teacher (an EMA copy of both) sees the large crops only."""
    name = "dino"
    structural = ("prototypes", "norm_last_layer")
    default_head = (2048, 256, 3)
    head_style = "dino"

    def check(self, key, peer, cfg):
        s = peer.dino
        for k in ("momentum", "center_momentum"):
            if not 0 <= getattr(s, k) < 1:
                raise ConfigError(f"{key}.dino.{k} must be in [0, 1), got {getattr(s, k)}")
        for k in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if not getattr(s, k) > 0:
                raise ConfigError(f"{key}.dino.{k} must be positive, got {getattr(s, k)}")
        if s.prototypes < 1:
            raise ConfigError(f"{key}.dino.prototypes must be positive, got {s.prototypes}")
        for k in ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
            if getattr(s, k) < 0:
                raise ConfigError(f"{key}.dino.{k} must be 0 or more, got {getattr(s, k)}")

    def predictor(self, peer):
        return Prototypes(peer.head_out, peer.dino.prototypes, peer.dino.norm_last_layer)

    def make_state(self, peer_cfg, peer, seed):
        return DINOState(peer, peer_cfg.dino)

    def state_bytes(self, peer_cfg, peer):
        return module_bytes(peer) + peer_cfg.dino.prototypes * 4

    def loss_bytes_per_image(self, peer_cfg, crops, large):
        """fp32 scores over the K prototypes: the student's (kept by its Crops) and their log-softmax for every
        crop, the teacher's scores and softmax for the large crops, and the student's scores' gradient."""
        return peer_cfg.dino.prototypes * 4 * (3 * crops + 2 * large)

    def loss(self, name, out, peer, targets):
        *teacher_probs, _ = targets
        student = out.split(losses.at_least_fp32(out.p))
        return {f"{name}/dino": losses.dino_loss(student, teacher_probs, peer.dino.student_temp)}


for _method in (SimCLR, MoCoV2, SimSiam, BYOL, VICReg, BarlowTwins, DINO):
    METHODS.register(_method.name, _method())

"""The SSL methods a peer learns with (`peers.NAME.ssl`), looked up by name.

Each method is one class: it declares what the trainer must build for it (a predictor head, a projection that ends
in an affine-free BatchNorm, a momentum key encoder with or without a queue of negatives), its default temperature,
which of the peer's embeddings enter DoGo's KL, and its own loss. The config, the heads, the target makers, the
memory estimate and the objectives ask the registry; none of them compares method names. A new method (BYOL, say)
is one class here, its tests, and its row in the README.

A peer's outputs are (z1, z2): its projections of both views, (b, d) each, unnormalised; a method with a predictor
adds (p1, p2).
"""
from __future__ import annotations

import difflib
from typing import ClassVar

import torch

from dogo.engine import losses
from dogo.engine.config import ConfigError
from dogo.models import Peer


class Method:
    name: ClassVar[str]
    default_tau: ClassVar[float | None] = None  # NT-Xent / InfoNCE temperature when peers.NAME.tau is empty
    contrastive: ClassVar[bool] = False  # NT-Xent over the (all-gathered) batch: computed by the tiled kernel
    predictor: ClassVar[bool] = False  # a prediction head on the projection (SimSiam, BYOL)
    whitened_projection: ClassVar[bool] = False  # the projection ends in a BN without affine parameters (SimSiam)
    momentum_encoder: ClassVar[bool] = False  # an EMA copy of the peer makes keys (MoCo, BYOL)
    queue: ClassVar[bool] = False  # keys of earlier steps kept as negatives (MoCo)

    def check(self, key: str, peer, cfg) -> None:
        """Raise ConfigError for settings of this peer (`key`: peers.NAME) that the method cannot use."""

    def key_views(self, peer) -> tuple[bool, bool]:
        """Which views (1, 2) the momentum encoder makes keys of."""
        return True, True

    def loss(self, name: str, out: tuple[torch.Tensor, ...], peer, targets) -> dict[str, torch.Tensor]:
        """The method's own terms outside the tiled kernel, named f'{name}/...'."""
        return {}

    def kl_embeddings(self, out: tuple[torch.Tensor, ...], partner: "Method") -> tuple[tuple, tuple]:
        """(own, as_target): the two views' embeddings from which DoGo's KL takes this peer's own similarity
        distribution and the one its partner is pulled towards. By default its projections for both."""
        return out[:2], out[:2]


METHODS: dict[str, Method] = {}


def build_peer(peer_cfg) -> Peer:
    """The network a resolved PeerConfig describes, with what its method asks for (a predictor, a whitened
    projection)."""
    method = method_named(peer_cfg.ssl)
    return Peer(peer_cfg.arch, peer_cfg.cifar_stem, peer_cfg.head_hidden, peer_cfg.head_out,
                peer_cfg.zero_init_residual, pred_hidden=peer_cfg.pred_hidden if method.predictor else 0,
                out_bn=method.whitened_projection)


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS:
        raise ValueError(f"SSL method '{cls.name}' is registered twice")
    METHODS[cls.name] = cls()
    return cls


def method_named(name: str, key: str = "ssl") -> Method:
    """The registered method, or a ConfigError naming `key`, the nearest name and all of them."""
    if name in METHODS:
        return METHODS[name]
    near = difflib.get_close_matches(str(name), list(METHODS), n=1, cutoff=0.4)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    raise ConfigError(f"{key}: {name!r} is not a registered SSL method ({', '.join(METHODS)}){hint}")


@register_method
class SimCLR(Method):
    """NT-Xent over the global batch (SimCLR); the tiled kernel computes it, with DoGo's KL in the same walk."""
    name = "simclr"
    default_tau = 0.1  # SimCLR's ImageNet temperature
    contrastive = True


@register_method
class MoCoV2(Method):
    """InfoNCE of view-1 queries against the momentum encoder's view-2 keys and a queue of earlier keys (MoCo v2);
    with peers.NAME.moco_symmetric both directions, averaged."""
    name = "mocov2"
    default_tau = 0.2  # MoCo v2's
    momentum_encoder = True
    queue = True

    def check(self, key: str, peer, cfg) -> None:
        if not 0 <= peer.momentum < 1:
            raise ConfigError(f"{key}.momentum must be in [0, 1), got {peer.momentum}")
        per_step = sum(self.key_views(peer)) * cfg.data.batch_size
        if peer.queue_size < per_step:
            raise ConfigError(f"{key}.queue_size={peer.queue_size} holds less than one step's keys ({per_step}); "
                              f"make it larger")

    def key_views(self, peer) -> tuple[bool, bool]:
        return peer.moco_symmetric, True  # MoCo's own form needs view 2's keys only

    def loss(self, name, out, peer, targets):
        k1, k2 = targets.keys[name]
        q1, q2 = losses.normalize(out[0]), losses.normalize(out[1])
        return {f"{name}/infonce": losses.mocov2_loss(q1, q2, k1, k2, targets.queues[name], peer.tau,
                                                      peer.moco_symmetric)}


@register_method
class SimSiam(Method):
    """Negative cosine between each view's prediction and the other view's projection behind a stop-gradient."""
    name = "simsiam"
    predictor = True
    whitened_projection = True

    def loss(self, name, out, peer, targets):
        return {f"{name}/simsiam": losses.simsiam_loss(*(losses.at_least_fp32(x) for x in out))}

    def kl_embeddings(self, out, partner):
        """As DoGo's code (util/train_util.py): the predictions of both views; but when the partner has a predictor
        too (two SimSiam peers), the partner is pulled towards this peer's projections."""
        predictions = (out[2], out[3])
        return predictions, (out[:2] if partner.predictor else predictions)

"""The peers a run trains: each a backbone, the projection head its method wants and, for a method with one, its
predictor; all of them in one module (PeerSet) so that one DDP wrapper and one backward cover them. A peer's
outputs for a step are its Crops."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn as nn

from dogo.core.registry import METHODS, OBJECTIVES
from dogo.models import Peer
from dogo.pipelines.views import view_plan


def build_peer(peer_cfg, image_size: int = 224) -> Peer:
    """The network a resolved PeerConfig describes for views of `image_size`, with what its method asks for (a
    predictor, a whitened projection)."""
    method = METHODS.get(peer_cfg.ssl, "ssl")
    peer = Peer(peer_cfg.arch, peer_cfg.cifar_stem, peer_cfg.head_hidden, peer_cfg.head_out,
                peer_cfg.zero_init_residual, out_bn=method.whitened_projection, head_layers=peer_cfg.head_layers,
                head_bias=method.projection_bias, image_size=image_size, arch_args=peer_cfg.arch_args,
                head_style=method.head_style)
    peer.predictor = method.predictor(peer_cfg)  # after the backbone and head: their initial weights per seed
    return peer


class Crops(NamedTuple):  # a NamedTuple: DDP's handling of outputs sees through it
    """One peer's outputs for its crops of a step's images, large crops first: crop v is rows v*b:(v+1)*b of each
    flat tensor (b images). Two views are the two-crop case."""
    z: torch.Tensor  # (crops * b, d) the projection head's outputs, unnormalised
    p: torch.Tensor | None  # (crops * b, d) the predictor's outputs (SimSiam, BYOL; DINO's K prototype scores)
    crops: int  # crops per image
    large: int  # how many of the first crops are the large ones

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        """A flat tensor (z, p, or one like them) as its crops, (b, d) each: views, no copy."""
        return list(t.chunk(self.crops))

    @staticmethod
    def of(z: Sequence[torch.Tensor], p: Sequence[torch.Tensor] | None = None, large: int = 2) -> "Crops":
        """From per-crop tensors (b, d) each, large first (the tests' and references' form)."""
        return Crops(torch.cat(list(z)), None if p is None else torch.cat(list(p)), len(z), large)


class PeerSet(nn.Module):
    """forward(groups) -> {peer: Crops}: peer k takes its set of the step's views (the objective's view_sets: DoGo
    gives each peer its own), its crops of each size through the backbone as one batch and the head once on all of
    them (BN statistics over the crops of a size, as SimCLR's code over both views), and, for a method with one, its
    predictor. The plan of views (pipelines/views.py) is built here, so that the peers and the loader share one.
    """

    def __init__(self, cfg):
        super().__init__()
        self.peers = nn.ModuleDict({name: build_peer(p, cfg.data.image_size) for name, p in cfg.peers.items()})
        objective = OBJECTIVES.get(cfg.objective.name, "objective.name")
        self.sets = objective.view_sets(list(cfg.peers), cfg.objective.share_views)
        self.plan = view_plan(cfg, len(set(self.sets.values())))

    def forward(self, groups: list[torch.Tensor]) -> dict[str, Crops]:
        out = {}
        for name, peer in self.peers.items():
            z = peer.forward_groups(self.plan.of_set(groups, self.sets[name]))
            p = peer.predictor(z) if peer.predictor is not None else None
            out[name] = Crops(z, p, self.plan.crops, self.plan.large)
        return out


def build_peers(cfg) -> PeerSet:
    """Peers at their initial weights: the same for a given seed, in training and in evaluation."""
    torch.manual_seed(cfg.seed)
    return PeerSet(cfg)

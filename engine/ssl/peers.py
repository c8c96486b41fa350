"""The peers a run trains: each a backbone, the projection head its method wants and, for a method with one, its
predictor; all of them in one module (PeerSet) so that one DDP wrapper and one backward cover them."""
from __future__ import annotations

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
                head_bias=method.projection_bias, image_size=image_size, arch_args=peer_cfg.arch_args)
    peer.predictor = method.predictor(peer_cfg)  # after the backbone and head: their initial weights per seed
    return peer


class PeerSet(nn.Module):
    """forward(groups) -> {peer: (z1, z2)}: peer k takes its set of the step's views (the objective's view_sets: DoGo
    gives each peer its own); both views go through it as one batch (one forward per peer, BN statistics over both
    views as in SimCLR's code). A peer with a predictor also returns its predictions: (z1, z2, p1, p2). The plan of
    views (pipelines/views.py) is built here, so that the peers and the loader share one.
    """

    def __init__(self, cfg):
        super().__init__()
        self.peers = nn.ModuleDict({name: build_peer(p, cfg.data.image_size) for name, p in cfg.peers.items()})
        objective = OBJECTIVES.get(cfg.objective.name, "objective.name")
        self.sets = objective.view_sets(list(cfg.peers), cfg.objective.share_views)
        self.plan = view_plan(cfg, len(set(self.sets.values())))

    def forward(self, groups: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
        out = {}
        for name, peer in self.peers.items():
            views = self.plan.of_set(groups, self.sets[name])[0]  # its two large views, one batch
            z = peer(views)
            out[name] = z.chunk(2) if peer.predictor is None else (*z.chunk(2), *peer.predictor(z).chunk(2))
        return out


def build_peers(cfg) -> PeerSet:
    """Peers at their initial weights: the same for a given seed, in training and in evaluation."""
    torch.manual_seed(cfg.seed)
    return PeerSet(cfg)

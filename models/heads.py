"""Projection heads and the peer (backbone + head) that every objective trains."""
from __future__ import annotations

import torch
import torch.nn as nn

from dogo.models.backbones import build_backbone


def projection_head(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """SimCLR's head: Linear-BN-ReLU-Linear. The first Linear has no bias since BN follows it."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out),
    )


class Peer(nn.Module):
    """A backbone and its projection head; forward returns the (unnormalised) embeddings."""

    def __init__(self, arch: str, cifar_stem: bool, head_hidden: int, head_out: int,
                 zero_init_residual: bool = False):
        super().__init__()
        self.arch = arch
        self.backbone, self.feature_dim = build_backbone(arch, cifar_stem, zero_init_residual)
        self.head = projection_head(self.feature_dim, head_hidden, head_out)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def build_peer(peer_cfg) -> Peer:
    return Peer(peer_cfg.arch, peer_cfg.cifar_stem, peer_cfg.head_hidden, peer_cfg.head_out,
                peer_cfg.zero_init_residual)

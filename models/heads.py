"""Projection heads and the peer (backbone + head) that every objective trains."""
from __future__ import annotations

import torch
import torch.nn as nn

from dogo.models.backbones import build_backbone


def projection_head(in_dim: int, hidden: int, out: int, out_bn: bool = False) -> nn.Sequential:
    """SimCLR's head: Linear-BN-ReLU-Linear. The first Linear has no bias since BN follows it.

    out_bn: SimSiam's projector ends in a BN without affine parameters (its output is whitened per dimension,
    which SimSiam needs against collapse); its last Linear then has no bias either.
    """
    layers = [nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
              nn.Linear(hidden, out, bias=not out_bn)]
    if out_bn:
        layers.append(nn.BatchNorm1d(out, affine=False))
    return nn.Sequential(*layers)


class Peer(nn.Module):
    """A backbone and its projection head; forward returns the (unnormalised) embeddings.

    A peer whose method has a predictor (SimSiam) also has one (Linear-BN-ReLU-Linear through a pred_hidden
    bottleneck), applied by the trainer to the embeddings; `forward` stays the embedding, which is what a teacher or the kNN monitor uses.
    """

    def __init__(self, arch: str, cifar_stem: bool, head_hidden: int, head_out: int,
                 zero_init_residual: bool = False, pred_hidden: int = 0, out_bn: bool = False):
        super().__init__()
        self.arch = arch
        self.backbone, self.feature_dim = build_backbone(arch, cifar_stem, zero_init_residual)
        self.head = projection_head(self.feature_dim, head_hidden, head_out, out_bn)
        self.predictor = projection_head(head_out, pred_hidden, head_out) if pred_hidden else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

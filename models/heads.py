"""Projection heads and the peer (backbone + head [+ predictor]) that every objective trains."""
from __future__ import annotations

import torch
import torch.nn as nn

from dogo.core.registry import BACKBONES
from dogo.models.backbones import build_backbone


def projection_head(in_dim: int, hidden: int, out: int, out_bn: bool = False, layers: int = 2,
                    bias: bool = True, style: str = "simclr") -> nn.Sequential:
    """SimCLR's head: Linear-BN-ReLU-Linear; with layers=3, VICReg's and Barlow Twins' expander
    Linear-BN-ReLU-Linear-BN-ReLU-Linear. A Linear followed by BN has no bias (BN removes it).

    out_bn: SimSiam's projector ends in a BN without affine parameters (its output is whitened per dimension,
    which SimSiam needs against collapse). bias: the last Linear's (none with out_bn, nor where the loss
    normalises it away: VICReg, Barlow Twins).

    style="dino": DINO's MLP, Linear-GELU blocks without BN (every Linear with a bias), its Linears drawn from a
    truncated normal of std 0.02 with zero biases (DINO's and lightly's DINOProjectionHead init).
    """
    dino = style == "dino"
    blocks, width = [], in_dim
    for _ in range(layers - 1):
        if dino:
            blocks += [nn.Linear(width, hidden), nn.GELU()]
        else:
            blocks += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        width = hidden
    blocks.append(nn.Linear(width, out, bias=bias and not out_bn))
    if out_bn:
        blocks.append(nn.BatchNorm1d(out, affine=False))
    if dino:
        for m in blocks:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return nn.Sequential(*blocks)


class Prototypes(nn.Module):
    """DINO's last layer: the bottleneck embedding L2-normalised, then a weight-normalised Linear without bias to
    K prototype scores: W = g * V / ||V|| row by row (torch's weight_norm, written out so that the EMA teacher and
    the optimiser see two plain parameters). With norm_last_layer, g stays 1 (no gradient): every prototype has unit
    norm. V starts as nn.Linear's default init, as DINO's and lightly's."""

    def __init__(self, dim: int, prototypes: int, norm_last_layer: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(dim, prototypes, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(prototypes, 1), requires_grad=not norm_last_layer)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # x W^T with W's rows scaled by g / ||V||: the scores against V, then each column scaled; autograd keeps the
        # (rows, K) scores rather than a K x d copy of the weights (the memory estimate counts what grows with rows)
        v = self.weight_v
        scale = (self.weight_g / v.norm(dim=1, keepdim=True)).reshape(1, -1)
        return nn.functional.linear(nn.functional.normalize(z, dim=-1), v) * scale


def head_shape(state: dict[str, torch.Tensor]) -> dict:
    """projection_head's arguments, read from one's state_dict (a DisCo teacher's head file)."""
    linears = sorted((int(k.split(".")[0]) for k, v in state.items() if k.endswith(".weight") and v.dim() == 2))
    if not linears:
        raise ValueError("no Linear weights: not a projection head")
    last = linears[-1]
    return {"hidden": state[f"{linears[0]}.weight"].shape[0], "out": state[f"{last}.weight"].shape[0],
            "layers": len(linears), "out_bn": f"{last + 1}.running_mean" in state, "bias": f"{last}.bias" in state}


class Peer(nn.Module):
    """A backbone and its projection head; forward returns the (unnormalised) embeddings.

    A peer whose method has a predictor (SimSiam, BYOL) carries it (`predictor`, built by the method), applied by
    the trainer to the embeddings; `forward` stays the embedding, which is what a teacher or the kNN monitor uses.
    """

    def __init__(self, arch: str, cifar_stem: bool, head_hidden: int, head_out: int,
                 zero_init_residual: bool = False, out_bn: bool = False, predictor: nn.Module | None = None,
                 head_layers: int = 2, head_bias: bool = True, image_size: int = 224, arch_args: dict | None = None,
                 head_style: str = "simclr", head: nn.Module | None = None):
        super().__init__()
        self.arch = arch
        self.backbone, self.num_features = build_backbone(arch, cifar_stem, zero_init_residual,
                                                          image_size=image_size, arch_args=arch_args)
        # parameters the backbone's library keeps out of weight decay (a ViT's position embedding, class token)
        self.no_weight_decay = {f"backbone.{n}" for n in BACKBONES.get(arch, "arch").no_weight_decay(self.backbone)}
        # head: a ready-made one (another library's, for a teacher) in place of projection_head's
        self.head = head if head is not None else projection_head(self.num_features, head_hidden, head_out, out_bn,
                                                                  head_layers, head_bias, head_style)
        self.embedding_dim = head_out
        self.predictor = predictor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def forward_groups(self, groups: list[torch.Tensor]) -> torch.Tensor:
        """The embeddings of views in groups of one size each (multi-crop): the backbone once per group, the head
        once on every group's features (its BatchNorm over all the crops, as DINO's MultiCropWrapper); rows in the
        groups' order. One group: forward itself."""
        if len(groups) == 1:
            return self(groups[0])
        return self.head(torch.cat([self.backbone(x) for x in groups]))

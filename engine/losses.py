"""The objectives' losses as functions of the embeddings: every training step goes through `objective_loss`.

Shapes: each rank holds b = B/W images; z1, z2 are (b, d) embeddings of the two views. Columns span the global
batch, rows are this rank's own. At world size 1 no process group is needed.

`objective_loss` computes the terms with the tiled kernel (contrastive.py). The straightforward functions below
(gather with gradient, full logits block) are its reference, in the tests and in `dogo bench loss`.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from dogo.engine.contrastive import contrastive_terms
from dogo.engine.distributed import gather_no_grad, gather_with_grad, rank


def normalize(z: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows in fp32 (fp64 inputs stay fp64), whatever the autocast dtype of the embeddings."""
    return F.normalize(z if z.dtype == torch.float64 else z.float(), dim=1)


def ntxent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent over this rank's 2b rows against all 2B columns; mean over the rows.

    z1, z2: (b, d), L2-normalised. Row i of view 1 has its positive at column B + g(i) and itself at g(i),
    where g(i) = rank * b + i is the image's global index.
    """
    b = z1.shape[0]
    rows = torch.cat([z1, z2])  # (2b, d)
    c1, c2 = gather_with_grad(z1), gather_with_grad(z2)
    cols = torch.cat([c1, c2])  # (2B, d)
    big_b = c1.shape[0]
    logits = rows @ cols.T / tau  # (2b, 2B)
    g = rank() * b + torch.arange(b, device=z1.device)
    self_col = torch.cat([g, g + big_b])
    pos_col = torch.cat([g + big_b, g])
    r = torch.arange(2 * b, device=z1.device)
    is_self = torch.arange(2 * big_b, device=z1.device) == self_col[:, None]  # built on the device: no copy
    logits = logits.masked_fill(is_self, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - logits[r, pos_col]).mean()


def cross_view_log_softmax(z1: torch.Tensor, z2: torch.Tensor, tau_kl: float, grad: bool = True) -> torch.Tensor:
    """log P: row-wise log-softmax of this rank's view-1 rows against every view-2 column, (b, B)."""
    cols = gather_with_grad(z2) if grad else gather_no_grad(z2)
    return torch.log_softmax(z1 @ cols.T / tau_kl, dim=1)


def dogo_kl(log_p_self: torch.Tensor, log_p_peer: torch.Tensor) -> torch.Tensor:
    """KL(P_peer || P_self) summed over columns, averaged over rows ('batchmean'); P_peer carries no gradient."""
    log_p_peer = log_p_peer.detach()
    return (log_p_peer.exp() * (log_p_peer - log_p_self)).sum(dim=1).mean()


def reference_terms(zs, taus, tau_kl=None) -> torch.Tensor:
    """The straightforward version of `contrastive_terms`: same inputs, same layout of terms."""
    n = len(taus)
    terms = [ntxent(zs[2 * k], zs[2 * k + 1], taus[k]) for k in range(n)]
    if tau_kl is not None:
        log_p = [cross_view_log_softmax(zs[2 * k], zs[2 * k + 1], tau_kl) for k in range(2)]
        terms += [dogo_kl(log_p[0], log_p[1]), dogo_kl(log_p[1], log_p[0])]
    return torch.stack(terms)


def objective_loss(embeddings: Mapping[str, tuple[torch.Tensor, torch.Tensor]], objective, peers
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss to backpropagate and its named terms (detached), for every peer.

    embeddings: peer name -> (z1, z2), raw head outputs of this rank's images, (b, d) each.
    objective: ObjectiveConfig; peers: name -> PeerConfig (tau, kl_weight).
    simclr: sum over peers of NT-Xent. dogo (2 peers): each peer adds kl_weight * KL(P_peer || P_self).
    """
    names = list(embeddings)
    zs = [normalize(z) for name in names for z in embeddings[name]]
    taus = [peers[name].tau for name in names]
    tau_kl = objective.tau_kl if objective.name == "dogo" else None
    values = contrastive_terms(zs, taus, tau_kl, objective.tile)
    terms: dict[str, torch.Tensor] = {}
    total = values[:len(names)].sum()
    for k, name in enumerate(names):
        terms[f"{name}/ntxent"] = values[k].detach()
    if tau_kl is not None:
        for k, name in enumerate(names):
            terms[f"{name}/kl"] = values[len(names) + k].detach()
            total = total + peers[name].kl_weight * values[len(names) + k]
    terms["loss"] = total.detach()
    return total, terms

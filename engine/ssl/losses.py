"""The losses as functions of the embeddings; the methods (methods.py) and objectives (objectives.py) combine them.

Shapes: each rank holds b = B/W images; a peer's crops (views) are (b, d) embeddings each, large crops first; two
views are the two-crop case (z1, z2). Columns span the global batch, rows are this rank's own. At world size 1 no
process group is needed.

NT-Xent and DoGo's KL run through the tiled kernel (contrastive.py, via `kernel_terms`). The straightforward
functions below (gather with gradient, full logits block) are its reference, in the tests and in `dogo bench loss`.
MoCo v2's InfoNCE, SimSiam's negative cosine and DisCo's embedding distance have no (B x B) block and are computed
directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dogo.engine.ssl.contrastive import contrastive_terms
from dogo.engine.dist.distributed import all_gather_rows, gather_with_grad, rank


def at_least_fp32(z: torch.Tensor) -> torch.Tensor:
    """Losses run in fp32 whatever the autocast dtype of the embeddings; fp64 inputs (the tests') stay fp64."""
    return z if z.dtype == torch.float64 else z.float()


def normalize(z: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows in fp32 (fp64 inputs stay fp64)."""
    return F.normalize(at_least_fp32(z), dim=1)


def ntxent(crops, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent over this rank's V b rows (V crops of b images) against all V B columns; mean over the rows.

    crops: V tensors (b, d), L2-normalised. Row (v, i) meets itself at column (v, g(i)), where g(i) = rank * b + i
    is the image's global index, and its positives at (w, g(i)) for every other crop w (solo-learn's multi-crop
    SimCLR): l = logsumexp over the non-self columns - logsumexp over the positives; for two crops the classic
    NT-Xent.
    """
    n, b = len(crops), crops[0].shape[0]
    rows = torch.cat(list(crops))  # (V b, d)
    gathered = [gather_with_grad(z) for z in crops]
    cols = torch.cat(gathered)  # (V B, d)
    big_b = gathered[0].shape[0]
    logits = rows @ cols.T / tau  # (V b, V B)
    g = (rank() * b + torch.arange(b, device=rows.device)).repeat(n)  # each row's image
    col = torch.arange(n * big_b, device=rows.device)  # built on the device: no copy
    self_col = g + big_b * torch.arange(n, device=rows.device).repeat_interleave(b)
    is_self = col == self_col[:, None]
    same_image = (col % big_b) == g[:, None]
    logits = logits.masked_fill(is_self, float("-inf"))
    positives = logits.masked_fill(~same_image, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(positives, dim=1)).mean()


def cross_view_log_softmax(z1: torch.Tensor, z2: torch.Tensor, tau_kl: float, grad: bool = True) -> torch.Tensor:
    """log P: row-wise log-softmax of this rank's view-1 rows against every view-2 column, (b, B)."""
    cols = gather_with_grad(z2) if grad else all_gather_rows(z2)
    return torch.log_softmax(z1 @ cols.T / tau_kl, dim=1)


def dogo_kl(log_p_self: torch.Tensor, log_p_peer: torch.Tensor) -> torch.Tensor:
    """KL(P_peer || P_self) summed over columns, averaged over rows ('batchmean'); P_peer carries no gradient."""
    log_p_peer = log_p_peer.detach()
    return (log_p_peer.exp() * (log_p_peer - log_p_self)).sum(dim=1).mean()


def reference_terms(crops, taus, tau_kl=None, kl_pairs=((0, 1),)) -> torch.Tensor:
    """The straightforward version of `contrastive_terms`: same inputs, same layout of terms."""
    terms = [ntxent(crops[k], tau) for k, tau in enumerate(taus) if tau is not None]
    if tau_kl is not None:
        log_p = [[cross_view_log_softmax(crops[k][a], crops[k][c], tau_kl) for a, c in kl_pairs] for k in range(2)]
        terms += [torch.stack([dogo_kl(mine, other) for mine, other in zip(log_p[k], log_p[1 - k])]).mean()
                  for k in range(2)]
    return torch.stack(terms)


def infonce_with_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo's InfoNCE: each query's positive is its own key, its negatives every key in the queue; mean over rows.

    q: (b, d) L2-normalised queries (with gradient); k: (b, d) normalised keys and queue: (K, d), neither with
    gradient. The (b, 1 + K) logits block is small next to the backbones (b=256, K=65536: 67 MB in fp32).
    """
    pos = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([pos, q @ queue.T], dim=1) / tau
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def mocov2_loss(queries, keys, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo v2 over crops: the mean over pairs (v, g) of InfoNCE of crop v's queries against large crop g's keys and
    the queue, for every g whose keys were made (keys[g] not None) and every other crop v.

    MoCo's own form: keys of crop 1 only, so (q_0, k_1) for two crops; symmetric (our option): keys of both large
    crops, the two directions averaged. Local crops (under DoGo or DisCo) query the large crops' keys."""
    pairs = [(v, g) for g, k in enumerate(keys) if k is not None for v in range(len(queries)) if v != g]
    return sum(infonce_with_queue(queries[v], keys[g], queue, tau) for v, g in pairs) / len(pairs)


def simsiam_loss(z1, z2, p1, p2) -> torch.Tensor:
    """SimSiam: negative cosine between each view's prediction and the other view's projection, which is
    detached (the stop-gradient); averaged over both directions and the rows."""
    cos = lambda p, z: F.cosine_similarity(p, z.detach(), dim=1).mean()
    return -0.5 * (cos(p1, z2) + cos(p2, z1))


def byol_loss(predictions, targets) -> torch.Tensor:
    """BYOL over crops, as solo-learn sums it: 2 - 2 cos between crop v's prediction and the target network's
    (normalised, gradient-free) projection of large crop g, averaged over the rows, summed over every large crop g
    and every other crop v. Two crops: both directions summed (BYOL's loss); it grows with the crops."""
    cos = lambda p, t: F.cosine_similarity(p, t.detach(), dim=1).mean()
    return sum(2 - 2 * cos(predictions[v], t) for g, t in enumerate(targets)
               for v in range(len(predictions)) if v != g)


def dino_loss(student_logits, teacher_probs, student_temp: float) -> torch.Tensor:
    """DINO's cross-entropy: -sum_k t_k log softmax(s / student_temp)_k between the teacher's (centred, sharpened)
    distribution over the prototypes for large crop g and the student's for every other crop v, averaged over the
    rows and over the pairs (g, v != g), as DINO's DINOLoss and lightly's. student_logits: one (b, K) tensor per crop,
    large first; teacher_probs: one per large crop."""
    log_p = [F.log_softmax(s / student_temp, dim=-1) for s in student_logits]
    terms = [soft_cross_entropy(log_p[v], t) for g, t in enumerate(teacher_probs) for v in range(len(log_p)) if v != g]
    return sum(terms) / len(terms)


def soft_cross_entropy(log_p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-sum_k target_k log_p_k, a mean over the rows."""
    return -(target * log_p).sum(dim=-1).mean()


def _off_diagonal_square_sum(m: torch.Tensor) -> torch.Tensor:
    """Sum of the squared off-diagonal entries, without a boolean mask (a mask's indexing waits for the host)."""
    return m.pow(2).sum() - torch.diagonal(m).pow(2).sum()


def vicreg_loss(z1, z2, sim_coeff: float, std_coeff: float, cov_coeff: float, eps: float = 1e-4) -> torch.Tensor:
    """VICReg (Bardes et al., its official main_vicreg.py): sim_coeff * MSE(z1, z2) over this rank's rows, plus over
    the global batch std_coeff * the mean hinge max(0, 1 - std) of each dimension (both views averaged) and
    cov_coeff * the squared off-diagonal covariances / d (both views summed)."""
    invariance = F.mse_loss(z1, z2)
    g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
    n, d = g1.shape
    variance = covariance = 0
    for g in (g1, g2):
        g = g - g.mean(dim=0)
        variance = variance + F.relu(1 - torch.sqrt(g.pow(2).sum(dim=0) / (n - 1) + eps)).mean() / 2
        covariance = covariance + _off_diagonal_square_sum(g.T @ g / (n - 1)) / d
    return sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance


def barlow_twins_loss(z1, z2, lambd: float) -> torch.Tensor:
    """Barlow Twins (Zbontar et al.): each embedding dimension standardised over the global batch (BatchNorm's
    statistics, eps 1e-5), C = z1^T z2 / N, then sum (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2. Every rank computes
    the same global loss."""
    g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
    n1, n2 = (F.batch_norm(g, None, None, training=True) for g in (g1, g2))
    c = n1.T @ n2 / g1.shape[0]
    return (torch.diagonal(c) - 1).pow(2).sum() + lambd * _off_diagonal_square_sum(c)


def embedding_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """DisCo's distillation term for one view: squared L2 distance between the L2-normalised student and teacher
    embeddings, summed over dimensions and over this rank's rows, as DisCo's MSELoss(reduction='sum') over each
    GPU's batch. The teacher carries no gradient."""
    return (normalize(student) - normalize(teacher).detach()).pow(2).sum()


def disco_distance(student, teacher) -> torch.Tensor:
    """DisCo over crops: the teacher embeds the G large crops only. Each large crop's student embedding to the
    teacher's of the same crop (DisCo's two terms for two crops), each local crop's to every large crop's with
    weight 1/G (one unit per crop, as each large crop):
        sum_g d(s_g, t_g) + sum_{v >= G} (1/G) sum_g d(s_v, t_g)."""
    large = len(teacher)
    own = sum(embedding_distance(s, t) for s, t in zip(student[:large], teacher))
    local = [embedding_distance(s, t) for s in student[large:] for t in teacher]
    return own + sum(local) / large if local else own


def distill_cross_entropy(student_logits, teacher_probs, student_temp: float) -> torch.Tensor:
    """DisCo with a DINO teacher's prototypes as the target (the DINOv2 distillation recipe): the cross-entropy of the
    student's softmax over its prototypes (at student_temp) to the teacher's distribution, a mean over the rows,
    paired over crops as disco_distance pairs them: each large crop with the teacher's same crop, each local crop
    with every large crop at weight 1/G."""
    large = len(teacher_probs)
    log_p = [F.log_softmax(s / student_temp, dim=-1) for s in student_logits]  # once per crop
    own = sum(soft_cross_entropy(lp, t) for lp, t in zip(log_p[:large], teacher_probs))
    local = [soft_cross_entropy(lp, t) for lp in log_p[large:] for t in teacher_probs]
    return own + sum(local) / large if local else own


def kernel_terms(pairs: list[tuple[list, list]], taus: list, tau_kl: float | None, tile: int,
                 kl_pairs=((0, 1),)) -> torch.Tensor:
    """The tiled kernel's terms (layout of `contrastive_terms`) for peers given as (own, as_target) crops.

    When every peer's own and target crops are the same tensors, one walk of the columns computes every term.
    Otherwise (two SimSiam peers, neither with NT-Xent) each KL term takes a walk of its own, with the partner's
    target crops in the partner's slot; the other term of that walk is left out, so it sends no gradient."""
    if tau_kl is None or all(a is b for own, target in pairs for a, b in zip(own, target)):
        return contrastive_terms([[normalize(z) for z in own] for own, _ in pairs], taus, tau_kl, kl_pairs, tile)
    assert all(tau is None for tau in taus), "distinct KL targets arise only for peers without NT-Xent"
    kls = []
    for k in range(2):
        slots = [pairs[0][0], pairs[1][1]] if k == 0 else [pairs[0][1], pairs[1][0]]
        kls.append(contrastive_terms([[normalize(z) for z in crops] for crops in slots], taus, tau_kl, kl_pairs,
                                     tile)[k])
    return torch.stack(kls)

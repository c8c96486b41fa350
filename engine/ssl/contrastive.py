"""The tiled all-gather contrastive kernel: NT-Xent for each peer and DoGo's two KL terms, exact, with memory linear
in the batch.

Each rank holds b images (two views per peer, (b, d_k) each, L2-normalised; peers may differ in d_k); the columns are the B = W*b images of
every rank, all-gathered once without autograd. The rank's rows walk the columns in tiles of `tile` images
(2*tile columns: both views), keeping an online log-sum-exp per row (running max and rescaled sum), so no
(2b x 2B) block is ever formed. Forward saves only per-row log-sum-exps; backward recomputes each tile, forms
(P - target) and accumulates the rows' gradient and the gathered columns' gradient, then returns the columns'
gradient to their owners with one reduce-scatter.

DoGo's KL(P_peer || P_k) over view-1 rows against view-2 columns at tau_kl reuses the same tile products: per row it
needs both peers' log-sum-exps and E_{P_peer}[S_peer - S_k], accumulated online with the same rescaling. Its
gradient on S_k is (P_k - P_peer) / rows; the peer's P carries no gradient.

Output: one vector of terms, [ntxent_k for each peer with a temperature] then, with tau_kl, [kl_0, kl_1] where kl_k is
KL(P_other || P_k). Means are over this rank's rows (2b for NT-Xent, b for KL), as the straightforward version in
losses.py computes them; DDP's gradient averaging then makes the update that of the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

from dogo.engine.dist.distributed import all_gather_rows, rank, reduce_scatter_rows


@dataclass(frozen=True)
class KernelSpec:
    taus: tuple[float | None, ...]  # NT-Xent temperature of each peer; None: the peer is in the KL only
    tau_kl: float | None  # DoGo KL temperature between peers 0 and 1; None: no KL terms
    tile: int  # images per tile, along the rows and along the columns


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32 for bf16/fp16/fp32 embeddings, in float64 for float64 ones (the tests' exact mode)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot(rows: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rows @ cols.T with `dtype` accumulation and output. On CUDA, bf16 inputs go through the tensor cores with an
    fp32 output; elsewhere the (small) operands are upcast."""
    if rows.dtype == dtype:
        return rows @ cols.T
    if rows.is_cuda:
        return torch.mm(rows, cols.T, out_dtype=dtype)
    return rows.to(dtype) @ cols.to(dtype).T


def _mask_self(logits: torch.Tensor, r: int, t: int, row0: int, col0: int) -> None:
    """Set -inf where a row meets its own column. logits is (2r, 2t) laid out [view1; view2] x [view1, view2];
    row i of the tile is global image row0 + i, column j is global image col0 + j. The self entries of each
    view's diagonal block lie on one diagonal, offset by row0 - col0."""
    offset = row0 - col0
    if -r < offset < t:
        for v in (0, 1):
            logits[v * r:(v + 1) * r, v * t:(v + 1) * t].diagonal(offset).fill_(float("-inf"))


def _tiles(n: int, tile: int):
    for start in range(0, n, tile):
        yield start, min(start + tile, n)


class _OnlineLSE:
    """Running max and rescaled sum of exp per row; optionally also the rescaled sum of exp(s) * x."""

    def __init__(self, rows: int, dtype, device, weighted: bool = False):
        self.m = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
        self.l = torch.zeros(rows, dtype=dtype, device=device)
        self.acc = torch.zeros(rows, dtype=dtype, device=device) if weighted else None

    def update(self, s: torch.Tensor, x: torch.Tensor | None = None) -> None:
        m_new = torch.maximum(self.m, s.amax(dim=1))
        scale = torch.exp(self.m - m_new)
        e = torch.exp(s - m_new[:, None])
        self.l.mul_(scale).add_(e.sum(dim=1))
        if x is not None:
            self.acc.mul_(scale).add_((e * x).sum(dim=1))
        self.m = m_new

    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.l)


def _offsets(zs) -> list[int]:
    """Column offsets of each embedding in the gathered block (peers may embed in different sizes)."""
    out = [0]
    for z in zs:
        out.append(out[-1] + z.shape[1])
    return out


def _peer_views(cols: torch.Tensor, offs: list[int], n_peers: int, j0: int, j1: int) -> list[torch.Tensor]:
    """Per peer, its (2t, d_k) column tile: both views of images j0..j1 from the gathered (B, sum d) block."""
    return [torch.cat([cols[j0:j1, offs[2 * k]:offs[2 * k + 1]], cols[j0:j1, offs[2 * k + 1]:offs[2 * k + 2]]])
            for k in range(n_peers)]


class _TiledContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: KernelSpec, *zs: torch.Tensor) -> torch.Tensor:
        n_peers = len(zs) // 2
        b = zs[0].shape[0]
        offs = _offsets(zs)
        cdt = _compute_dtype(zs[0].dtype)
        dev = zs[0].device
        row_offset = rank() * b
        cols = all_gather_rows(torch.cat(zs, dim=1))  # (B, sum d): one collective for every peer and view
        big_b = cols.shape[0]
        kl = spec.tau_kl is not None
        ntx_peers = [k for k in range(n_peers) if spec.taus[k] is not None]
        lse_ntx = {k: torch.empty(2 * b, dtype=cdt, device=dev) for k in ntx_peers}
        lse_kl = [torch.empty(b, dtype=cdt, device=dev) for _ in range(2 if kl else 0)]
        expect_kl = [torch.empty(b, dtype=cdt, device=dev) for _ in range(2 if kl else 0)]
        with torch.autocast(dev.type, enabled=False):
            for i0, i1 in _tiles(b, spec.tile):
                r = i1 - i0
                rows = [torch.cat([zs[2 * k][i0:i1], zs[2 * k + 1][i0:i1]]) for k in range(n_peers)]
                ntx = {k: _OnlineLSE(2 * r, cdt, dev) for k in ntx_peers}
                # kl_state[k] accumulates lse of S_k and E_{P_k}[S_k - S_other] (the other peer's KL needs it)
                kl_state = [_OnlineLSE(r, cdt, dev, weighted=True) for _ in range(2 if kl else 0)]
                for j0, j1 in _tiles(big_b, spec.tile):
                    t = j1 - j0
                    col_tiles = _peer_views(cols, offs, n_peers, j0, j1)
                    s_kl = []
                    for k in range(n_peers):
                        if k not in ntx:  # a KL-only peer: just its view-1 rows x view-2 columns
                            s_kl.append(_dot(rows[k][:r], col_tiles[k][t:], cdt) / spec.tau_kl)
                            continue
                        s = _dot(rows[k], col_tiles[k], cdt)
                        if kl and k < 2:
                            s_kl.append(s[:r, t:] / spec.tau_kl)  # view-1 rows x view-2 columns
                        s.mul_(1.0 / spec.taus[k])
                        _mask_self(s, r, t, row_offset + i0, j0)
                        ntx[k].update(s)
                    if kl:
                        diff = s_kl[0] - s_kl[1]
                        kl_state[0].update(s_kl[0], diff)
                        kl_state[1].update(s_kl[1], diff.neg_())
                for k, st in ntx.items():
                    lse = st.lse()  # rows [view 1; view 2] of this block
                    lse_ntx[k][i0:i1], lse_ntx[k][b + i0:b + i1] = lse[:r], lse[r:]
                for k, st in enumerate(kl_state):
                    lse_kl[k][i0:i1] = st.lse()
                    expect_kl[k][i0:i1] = st.acc / st.l
            terms = []
            for k in ntx_peers:
                pos = (zs[2 * k].to(cdt) * zs[2 * k + 1].to(cdt)).sum(dim=1) / spec.taus[k]
                terms.append((lse_ntx[k] - torch.cat([pos, pos])).mean())
            if kl:
                # KL(P_1 || P_0) per row = E_{P_1}[S_1 - S_0] - lse_1 + lse_0, and symmetrically
                terms.append((expect_kl[1] - lse_kl[1] + lse_kl[0]).mean())
                terms.append((expect_kl[0] - lse_kl[0] + lse_kl[1]).mean())
        ctx.spec = spec
        ctx.save_for_backward(cols, *zs, *lse_ntx.values(), *lse_kl)
        return torch.stack(terms)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_terms: torch.Tensor):
        spec: KernelSpec = ctx.spec
        cols, *saved = ctx.saved_tensors
        n_peers = len(spec.taus)
        ntx_peers = [k for k in range(n_peers) if spec.taus[k] is not None]
        n_ntx = len(ntx_peers)
        zs = saved[:2 * n_peers]
        lse_ntx = dict(zip(ntx_peers, saved[2 * n_peers:2 * n_peers + n_ntx]))
        lse_kl = saved[2 * n_peers + n_ntx:]
        kl = spec.tau_kl is not None
        b = zs[0].shape[0]
        offs = _offsets(zs)
        cdt = _compute_dtype(zs[0].dtype)
        dev = zs[0].device
        row_offset = rank() * b
        big_b = cols.shape[0]
        g = grad_terms.to(cdt)
        c_ntx = {k: g[i] / (2 * b) for i, k in enumerate(ntx_peers)}  # d(term)/d(row loss): mean over 2b rows
        c_kl = [g[n_ntx + k] / b for k in range(2)] if kl else []
        grad_rows = [torch.zeros(2 * b, zs[2 * k].shape[1], dtype=cdt, device=dev) for k in range(n_peers)]
        grad_cols = torch.zeros(big_b, offs[-1], dtype=cdt, device=dev)
        with torch.autocast(dev.type, enabled=False):
            for i0, i1 in _tiles(b, spec.tile):
                r = i1 - i0
                rows = [torch.cat([zs[2 * k][i0:i1], zs[2 * k + 1][i0:i1]]) for k in range(n_peers)]
                rows_c = [x.to(cdt) for x in rows]
                lse_rows = {k: torch.cat([lse[i0:i1], lse[b + i0:b + i1]])[:, None] for k, lse in lse_ntx.items()}
                for j0, j1 in _tiles(big_b, spec.tile):
                    t = j1 - j0
                    col_tiles = _peer_views(cols, offs, n_peers, j0, j1)
                    grad_s, p_kl = [], []
                    for k in range(n_peers):
                        if k not in lse_rows:  # KL-only peer: its gradient lives in the view1 x view2 block
                            s = _dot(rows[k][:r], col_tiles[k][t:], cdt)
                            p_kl.append(torch.exp(s / spec.tau_kl - lse_kl[k][i0:i1, None]))
                            grad_s.append(torch.zeros(2 * r, 2 * t, dtype=cdt, device=dev))
                            continue
                        s = _dot(rows[k], col_tiles[k], cdt)
                        if kl and k < 2:
                            p_kl.append(torch.exp(s[:r, t:] / spec.tau_kl - lse_kl[k][i0:i1, None]))
                        s.mul_(1.0 / spec.taus[k])
                        _mask_self(s, r, t, row_offset + i0, j0)
                        # d loss / d (z_i . z_j): softmax over the row's non-self columns, times the row weight / tau
                        grad_s.append(s.sub_(lse_rows[k]).exp_().mul_(c_ntx[k] / spec.taus[k]))
                    if kl:
                        # peer k's KL on S_k = view1 . view2 / tau_kl: (P_k - P_other) / b, per unit of its term
                        diff = p_kl[0] - p_kl[1]
                        grad_s[0][:r, t:].addcmul_(diff, c_kl[0] / spec.tau_kl)
                        grad_s[1][:r, t:].addcmul_(diff, -c_kl[1] / spec.tau_kl)
                    for k in range(n_peers):
                        col_c = col_tiles[k].to(cdt)
                        gs = grad_s[k]
                        grad_rows[k][i0:i1].add_(gs[:r] @ col_c)
                        grad_rows[k][b + i0:b + i1].add_(gs[r:] @ col_c)
                        gc = gs.T @ rows_c[k]  # (2t, d_k): gradient of this tile's columns, both views
                        grad_cols[j0:j1, offs[2 * k]:offs[2 * k + 1]].add_(gc[:t])
                        grad_cols[j0:j1, offs[2 * k + 1]:offs[2 * k + 2]].add_(gc[t:])
            own = reduce_scatter_rows(grad_cols)  # (b, sum d): every rank's gradient of this rank's embeddings
            grads = []
            for k in range(n_peers):
                z1, z2 = zs[2 * k].to(cdt), zs[2 * k + 1].to(cdt)
                # the positive logit z1_i . z2_i / tau appears in two rows (view 1's and view 2's)
                pos = 2 * c_ntx[k] / spec.taus[k] if k in c_ntx else 0.0
                g1 = grad_rows[k][:b] + own[:, offs[2 * k]:offs[2 * k + 1]] - pos * z2
                g2 = grad_rows[k][b:] + own[:, offs[2 * k + 1]:offs[2 * k + 2]] - pos * z1
                grads += [g1.to(zs[2 * k].dtype), g2.to(zs[2 * k + 1].dtype)]
        return (None, *grads)


def contrastive_terms(zs: Sequence[torch.Tensor], taus: Sequence[float | None], tau_kl: float | None = None,
                      tile: int = 1024) -> torch.Tensor:
    """Loss terms of the peers' L2-normalised embeddings zs = (z1_0, z2_0, z1_1, z2_1, ...), (b, d) each.

    Returns [ntxent_k for each peer whose tau is not None] + ([KL(P_1 || P_0), KL(P_0 || P_1)] when tau_kl is
    given, for exactly 2 peers). A peer with tau None takes part in the KL only (a SimSiam or MoCo peer of DoGo:
    its pair is then whatever two embeddings its similarity is taken between, e.g. predictor x projector).
    Works at world size 1 without a process group and under torchrun (gloo or NCCL).
    """
    if len(zs) != 2 * len(taus):
        raise ValueError(f"expected two views per peer: {len(zs)} embeddings for {len(taus)} temperatures")
    if tau_kl is not None and len(taus) != 2:
        raise ValueError(f"the DoGo KL needs exactly 2 peers, got {len(taus)}")
    if tile < 1:
        raise ValueError(f"tile must be a positive number of images, got {tile}")
    if any(zs[2 * k].shape != zs[2 * k + 1].shape for k in range(len(taus))):
        raise ValueError("each peer's two views must have the same shape; peers may differ in embedding size")
    if tau_kl is None and any(t is None for t in taus):
        raise ValueError("a peer without an NT-Xent temperature only makes sense with the DoGo KL (tau_kl)")
    spec = KernelSpec(tuple(None if t is None else float(t) for t in taus), None if tau_kl is None else float(tau_kl), int(tile))
    return _TiledContrastive.apply(spec, *zs)

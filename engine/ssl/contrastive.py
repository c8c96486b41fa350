"""The tiled all-gather contrastive kernel: NT-Xent for each peer over all its crops (SimCLR multi-crop) and DoGo's
two KL terms over pairs of crops, exact, with memory linear in the batch and in the crops.

Each rank holds b images; peer k embeds V_k crops of each ((b, d_k) each, L2-normalised, large crops first; peers may
differ in d_k). The columns are the crops of the B = W*b images of every rank, all-gathered once without autograd.
The rank's rows walk the columns in tiles of `tile` images (V*tile columns: every crop), keeping an online
log-sum-exp per row (running max and rescaled sum), so no (V b x V B) block is ever formed. Forward saves only
per-row log-sum-exps; backward recomputes each tile, forms (P - target) and accumulates the rows' gradient and the
gathered columns' gradient, then returns the columns' gradient to their owners with one reduce-scatter.

NT-Xent over V crops (solo-learn's multi-crop SimCLR): every crop is a row and a column; the positives of crop v of
image i are the other V - 1 crops of image i, all on this rank, so they are computed apart from the walk:
    l_(v,i) = lse_{j != (v,i)} s_(v,i),j - lse_{w != v} s_(v,i),(w,i),   s = z . z' / tau,
which for V = 2 is the classic NT-Xent (the second log-sum-exp over the one positive).

DoGo's KL(P_peer || P_k) for a pair of crops (a, c) takes the rows of crop a against the columns of crop c at tau_kl
and reuses the same tile products: per row it needs both peers' log-sum-exps and E_{P_peer}[S_peer - S_k],
accumulated online with the same rescaling. Its gradient on S_k is (P_k - P_peer) / rows; the peer's P carries no
gradient. A peer's KL term is the mean over the pairs.

Output: one vector of terms, [ntxent_k for each peer with a temperature] then, with tau_kl, [kl_0, kl_1] where kl_k is
KL(P_other || P_k). Means are over this rank's rows (V b for NT-Xent, b per KL pair), as the straightforward version
in losses.py computes them; DDP's gradient averaging then makes the update that of the global batch.
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
    crops: tuple[int, ...]  # crops per image of each peer
    kl_pairs: tuple[tuple[int, int], ...]  # (row crop, column crop) of each KL term

    def contrastive(self, k: int) -> bool:
        return self.taus[k] is not None

    def row_crops(self, k: int) -> list[int]:
        """The crops peer k's rows take: all for NT-Xent, else the KL pairs' row crops."""
        if self.contrastive(k):
            return list(range(self.crops[k]))
        return sorted({a for a, _ in self.kl_pairs})

    def col_crops(self, k: int) -> list[int]:
        if self.contrastive(k):
            return list(range(self.crops[k]))
        return sorted({c for _, c in self.kl_pairs})

    @property
    def kl(self) -> bool:
        return self.tau_kl is not None


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


def _mask_self(logits: torch.Tensor, r: int, t: int, row0: int, col0: int, crops: int) -> None:
    """Set -inf where a row meets its own column. logits is (V r, V t), crops laid out [crop 0; crop 1; ...] along
    both axes; row i of the tile is global image row0 + i, column j is global image col0 + j. The self entries of
    each crop's diagonal block lie on one diagonal, offset by row0 - col0."""
    offset = row0 - col0
    if -r < offset < t:
        for v in range(crops):
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


class _Layout:
    """Where each peer's crops lie: in the flat list of inputs, and as columns of the gathered (B, sum d) block."""

    def __init__(self, spec: KernelSpec, zs: Sequence[torch.Tensor]):
        self.first, self.offs = [], []
        i, col = 0, 0
        for k, n in enumerate(spec.crops):
            self.first.append(i)
            offs = []
            for z in zs[i:i + n]:
                offs.append(col)
                col += z.shape[1]
            self.offs.append(offs)
            i += n
        self.width = col

    def crops(self, zs: Sequence[torch.Tensor], k: int, n: int) -> Sequence[torch.Tensor]:
        return zs[self.first[k]:self.first[k] + n]

    def col_tile(self, cols: torch.Tensor, k: int, which: list[int], d: int, j0: int, j1: int) -> torch.Tensor:
        """Peer k's (len(which) t, d) column tile: crops `which` of images j0..j1 from the gathered block."""
        return torch.cat([cols[j0:j1, self.offs[k][w]:self.offs[k][w] + d] for w in which])


def _row_tile(crops: Sequence[torch.Tensor], which: list[int], i0: int, i1: int) -> torch.Tensor:
    return torch.cat([crops[u][i0:i1] for u in which])


def _kl_block(s: torch.Tensor, spec: KernelSpec, k: int, pair: tuple[int, int], r: int, t: int) -> torch.Tensor:
    """Rows of crop a x columns of crop c of peer k's unscaled tile product, for KL pair (a, c)."""
    a, c = pair
    ra, cc = spec.row_crops(k).index(a), spec.col_crops(k).index(c)
    return s[ra * r:(ra + 1) * r, cc * t:(cc + 1) * t]


def _positives(crops: Sequence[torch.Tensor], tau: float, dtype: torch.dtype) -> torch.Tensor:
    """(V, V, b) logits of each crop of an image against its other crops (the positives), -inf on the diagonal."""
    z = torch.stack([x.to(dtype) for x in crops])  # (V, b, d)
    pos = torch.einsum("vbd,wbd->vwb", z, z) / tau
    eye = torch.eye(len(crops), dtype=torch.bool, device=z.device)
    return pos.masked_fill(eye[:, :, None], float("-inf"))


class _TiledContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: KernelSpec, *zs: torch.Tensor) -> torch.Tensor:
        n_peers = len(spec.taus)
        layout = _Layout(spec, zs)
        peers = [layout.crops(zs, k, spec.crops[k]) for k in range(n_peers)]
        b = zs[0].shape[0]
        cdt = _compute_dtype(zs[0].dtype)
        dev = zs[0].device
        row_offset = rank() * b
        cols = all_gather_rows(torch.cat(zs, dim=1))  # (B, sum d): one collective for every peer and crop
        big_b = cols.shape[0]
        pairs = spec.kl_pairs if spec.kl else ()
        ntx_peers = [k for k in range(n_peers) if spec.contrastive(k)]
        lse_ntx = {k: torch.empty(spec.crops[k] * b, dtype=cdt, device=dev) for k in ntx_peers}
        lse_kl = [[torch.empty(b, dtype=cdt, device=dev) for _ in range(2)] for _ in pairs]
        expect_kl = [[torch.empty(b, dtype=cdt, device=dev) for _ in range(2)] for _ in pairs]
        with torch.autocast(dev.type, enabled=False):
            for i0, i1 in _tiles(b, spec.tile):
                r = i1 - i0
                rows = [_row_tile(peers[k], spec.row_crops(k), i0, i1) for k in range(n_peers)]
                ntx = {k: _OnlineLSE(spec.crops[k] * r, cdt, dev) for k in ntx_peers}
                # kl_state[p][k] accumulates lse of S_k and E_{P_k}[S_k - S_other] (the other peer's KL needs it)
                kl_state = [[_OnlineLSE(r, cdt, dev, weighted=True) for _ in range(2)] for _ in pairs]
                for j0, j1 in _tiles(big_b, spec.tile):
                    t = j1 - j0
                    s_kl = [[None, None] for _ in pairs]
                    for k in range(n_peers):
                        d = peers[k][0].shape[1]
                        s = _dot(rows[k], layout.col_tile(cols, k, spec.col_crops(k), d, j0, j1), cdt)
                        if k < 2:
                            for p, pair in enumerate(pairs):
                                s_kl[p][k] = _kl_block(s, spec, k, pair, r, t) / spec.tau_kl
                        if k in ntx:
                            s.mul_(1.0 / spec.taus[k])
                            _mask_self(s, r, t, row_offset + i0, j0, spec.crops[k])
                            ntx[k].update(s)
                    for p in range(len(pairs)):
                        diff = s_kl[p][0] - s_kl[p][1]
                        kl_state[p][0].update(s_kl[p][0], diff)
                        kl_state[p][1].update(s_kl[p][1], diff.neg_())
                for k, st in ntx.items():
                    lse = st.lse()  # rows [crop 0; crop 1; ...] of this block
                    for v in range(spec.crops[k]):
                        lse_ntx[k][v * b + i0:v * b + i1] = lse[v * r:(v + 1) * r]
                for p, states in enumerate(kl_state):
                    for k, st in enumerate(states):
                        lse_kl[p][k][i0:i1] = st.lse()
                        expect_kl[p][k][i0:i1] = st.acc / st.l
            terms = []
            for k in ntx_peers:
                lse_pos = torch.logsumexp(_positives(peers[k], spec.taus[k], cdt), dim=1).reshape(-1)  # (V b)
                terms.append((lse_ntx[k] - lse_pos).mean())
            if pairs:
                # KL(P_1 || P_0) per row = E_{P_1}[S_1 - S_0] - lse_1 + lse_0, and symmetrically; mean over pairs
                for k, other in ((0, 1), (1, 0)):
                    terms.append(torch.stack([(e[other] - l[other] + l[k]).mean()
                                              for e, l in zip(expect_kl, lse_kl)]).mean())
        ctx.spec = spec
        ctx.save_for_backward(cols, *zs, *lse_ntx.values(), *(x for pair in lse_kl for x in pair))
        return torch.stack(terms)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_terms: torch.Tensor):
        spec: KernelSpec = ctx.spec
        cols, *saved = ctx.saved_tensors
        n_peers = len(spec.taus)
        n_in = sum(spec.crops)
        zs = saved[:n_in]
        layout = _Layout(spec, zs)
        peers = [layout.crops(zs, k, spec.crops[k]) for k in range(n_peers)]
        ntx_peers = [k for k in range(n_peers) if spec.contrastive(k)]
        n_ntx = len(ntx_peers)
        lse_ntx = dict(zip(ntx_peers, saved[n_in:n_in + n_ntx]))
        pairs = spec.kl_pairs if spec.kl else ()
        flat_kl = saved[n_in + n_ntx:]
        lse_kl = [flat_kl[2 * p:2 * p + 2] for p in range(len(pairs))]
        b = zs[0].shape[0]
        cdt = _compute_dtype(zs[0].dtype)
        dev = zs[0].device
        row_offset = rank() * b
        big_b = cols.shape[0]
        g = grad_terms.to(cdt)
        # d(term)/d(row loss): the mean over V b rows; a KL term's over b rows of each of its pairs
        c_ntx = {k: g[i] / (spec.crops[k] * b) for i, k in enumerate(ntx_peers)}
        c_kl = [g[n_ntx + k] / (b * len(pairs)) for k in range(2)] if pairs else []
        grad_rows = [torch.zeros(spec.crops[k] * b, peers[k][0].shape[1], dtype=cdt, device=dev)
                     for k in range(n_peers)]
        grad_cols = torch.zeros(big_b, layout.width, dtype=cdt, device=dev)
        with torch.autocast(dev.type, enabled=False):
            for i0, i1 in _tiles(b, spec.tile):
                r = i1 - i0
                row_crops = [spec.row_crops(k) for k in range(n_peers)]
                rows = [_row_tile(peers[k], row_crops[k], i0, i1) for k in range(n_peers)]
                rows_c = [x.to(cdt) for x in rows]
                lse_rows = {k: torch.cat([lse[v * b + i0:v * b + i1] for v in range(spec.crops[k])])[:, None]
                            for k, lse in lse_ntx.items()}
                for j0, j1 in _tiles(big_b, spec.tile):
                    t = j1 - j0
                    col_tiles = [layout.col_tile(cols, k, spec.col_crops(k), peers[k][0].shape[1], j0, j1)
                                 for k in range(n_peers)]
                    grad_s, p_kl = [], [[None, None] for _ in pairs]
                    for k in range(n_peers):
                        s = _dot(rows[k], col_tiles[k], cdt)
                        if k < 2:
                            for p, pair in enumerate(pairs):
                                block = _kl_block(s, spec, k, pair, r, t)
                                p_kl[p][k] = torch.exp(block / spec.tau_kl - lse_kl[p][k][i0:i1, None])
                        if k not in lse_rows:  # KL-only peer: its gradient lives in the pairs' blocks
                            grad_s.append(torch.zeros_like(s))
                            continue
                        s.mul_(1.0 / spec.taus[k])
                        _mask_self(s, r, t, row_offset + i0, j0, spec.crops[k])
                        # d loss / d (z_i . z_j): softmax over the row's non-self columns, times the row weight / tau
                        grad_s.append(s.sub_(lse_rows[k]).exp_().mul_(c_ntx[k] / spec.taus[k]))
                    for p, pair in enumerate(pairs):
                        # peer k's KL on S_k = crop a . crop c / tau_kl: (P_k - P_other) per unit of its term
                        diff = p_kl[p][0] - p_kl[p][1]
                        _kl_block(grad_s[0], spec, 0, pair, r, t).addcmul_(diff, c_kl[0] / spec.tau_kl)
                        _kl_block(grad_s[1], spec, 1, pair, r, t).addcmul_(diff, -c_kl[1] / spec.tau_kl)
                    for k in range(n_peers):
                        gs, d = grad_s[k], peers[k][0].shape[1]
                        gr = gs @ col_tiles[k].to(cdt)  # (rows, d_k): gradient of this tile's rows, every crop
                        for ui, u in enumerate(row_crops[k]):
                            grad_rows[k][u * b + i0:u * b + i1].add_(gr[ui * r:(ui + 1) * r])
                        gc = gs.T @ rows_c[k]  # (columns, d_k): gradient of this tile's columns, every crop
                        for wi, w in enumerate(spec.col_crops(k)):
                            grad_cols[j0:j1, layout.offs[k][w]:layout.offs[k][w] + d].add_(gc[wi * t:(wi + 1) * t])
            own = reduce_scatter_rows(grad_cols)  # (b, sum d): every rank's gradient of this rank's embeddings
            grads = []
            for k in range(n_peers):
                n, d = spec.crops[k], peers[k][0].shape[1]
                g_k = grad_rows[k].view(n, b, d)
                if k in c_ntx:
                    # each positive logit z_(v,i) . z_(w,i) / tau appears in the rows of v and of w: the softmax
                    # over a row's positives weights the other crops of its image
                    z = torch.stack([x.to(cdt) for x in peers[k]])
                    q = torch.softmax(_positives(peers[k], spec.taus[k], cdt), dim=1)  # (V, V, b)
                    pull = torch.einsum("vwb,wbd->vbd", q, z) + torch.einsum("vwb,vbd->wbd", q, z)
                    g_k = g_k - (c_ntx[k] / spec.taus[k]) * pull
                for v in range(n):
                    off = layout.offs[k][v]
                    grads.append((g_k[v] + own[:, off:off + d]).to(peers[k][v].dtype))
        return (None, *grads)


def contrastive_terms(crops: Sequence[Sequence[torch.Tensor]], taus: Sequence[float | None],
                      tau_kl: float | None = None, kl_pairs: Sequence[tuple[int, int]] = ((0, 1),),
                      tile: int = 1024) -> torch.Tensor:
    """Loss terms of the peers' L2-normalised crops: crops[k] is peer k's V_k crops, (b, d_k) each, large first.

    Returns [ntxent_k for each peer whose tau is not None] (over all its crops: each crop's positives are its
    image's other crops) + ([KL(P_1 || P_0), KL(P_0 || P_1)] when tau_kl is given, for exactly 2 peers: each the
    mean over kl_pairs (a, c) of the KL between the peers' softmaxes of crop-a rows against crop-c columns).
    A peer with tau None takes part in the KL only (a SimSiam or MoCo peer of DoGo: its crops are then whatever
    embeddings its similarity is taken between, e.g. its predictions). Works at world size 1 without a process
    group and under torchrun (gloo or NCCL).
    """
    if len(crops) != len(taus):
        raise ValueError(f"expected the crops of each peer: {len(crops)} peers' crops for {len(taus)} temperatures")
    if tau_kl is not None and len(taus) != 2:
        raise ValueError(f"the DoGo KL needs exactly 2 peers, got {len(taus)}")
    if tile < 1:
        raise ValueError(f"tile must be a positive number of images, got {tile}")
    for k, (peer, tau) in enumerate(zip(crops, taus)):
        if (len(peer) < 2 and tau is not None) or not peer:
            raise ValueError(f"peer {k}: NT-Xent pairs crops of each image: at least 2 crops, got {len(peer)}")
        if any(z.shape != peer[0].shape for z in peer):
            raise ValueError(f"peer {k}: its crops must have the same shape; peers may differ in embedding size")
    if len({z.shape[0] for peer in crops for z in peer}) != 1:
        raise ValueError("every crop holds the rank's same b images")
    if tau_kl is None and any(t is None for t in taus):
        raise ValueError("a peer without an NT-Xent temperature only makes sense with the DoGo KL (tau_kl)")
    if tau_kl is not None:
        if not kl_pairs:
            raise ValueError("the DoGo KL needs at least one pair of crops")
        for a, c in kl_pairs:
            if a == c or not all(0 <= x < min(len(crops[0]), len(crops[1])) for x in (a, c)):
                raise ValueError(f"KL pair ({a}, {c}): two different crops both peers have")
    spec = KernelSpec(tuple(None if t is None else float(t) for t in taus), None if tau_kl is None else float(tau_kl),
                      int(tile), tuple(len(peer) for peer in crops), tuple((int(a), int(c)) for a, c in kl_pairs))
    return _TiledContrastive.apply(spec, *(z for peer in crops for z in peer))

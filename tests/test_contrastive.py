"""The tiled contrastive kernel against the straightforward version (float64 and float32), gradcheck, bf16."""
import pytest
import torch
import torch.nn.functional as F

from dogo.engine.ssl.contrastive import contrastive_terms
from dogo.engine.ssl.losses import reference_terms


def _embeddings(b, d, n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1).to(dtype).requires_grad_()
            for _ in range(n)]


def _loss_and_grads(fn, zs, weights):
    """A random weighting of the terms, so that each term's gradient is checked, not only their sum."""
    terms = fn()
    grads = torch.autograd.grad((terms * weights).sum(), zs)
    return terms.detach(), grads


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _peers(zs, crops):
    """Flat embeddings as each peer's `crops` crops."""
    return [list(zs[k * crops:(k + 1) * crops]) for k in range(len(zs) // crops)]


CASES = [  # (images b, dim d, tile, temperatures, tau_kl or None for SimCLR, crops per image, KL pairs)
    (8, 16, 4, (0.5,), None, 2, None),  # tile divides the batch
    (11, 8, 4, (0.1,), None, 2, None),  # last tile short
    (7, 5, 1, (0.2, 0.3), 0.1, 2, None),  # one image per tile
    (13, 16, 5, (0.1, 0.5), 0.5, 2, None),
    (6, 32, 64, (1.0, 0.07), 0.1, 2, None),  # one tile covers everything
    (20, 12, 7, (0.3, 0.3, 0.2), None, 2, None),  # three peers, SimCLR each
    # multi-crop: every crop's positives are its image's other crops; DoGo's KL over pairs of crops
    (9, 8, 4, (0.3,), None, 3, None),
    (10, 6, 3, (0.2,), None, 5, None),  # last tile short, 5 crops
    (7, 5, 2, (0.2, 0.4), 0.1, 3, ((0, 1), (0, 2), (1, 2))),
    (11, 6, 4, (0.3, 0.2), 0.2, 5, ((0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4))),  # 2 large + 3 small
    (6, 4, 64, (0.5, 0.5), 0.1, 4, ((1, 3), (0, 2))),  # one tile; pairs in any order
]


@pytest.mark.parametrize("b,d,tile,taus,tau_kl,crops,kl_pairs", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_kernel_equals_straightforward(b, d, tile, taus, tau_kl, crops, kl_pairs, dtype, tol):
    zs = _embeddings(b, d, crops * len(taus), seed=b * 100 + d + tile, dtype=dtype)
    pairs = kl_pairs or ((0, 1),)
    n_terms = len(taus) + (2 if tau_kl else 0)
    weights = torch.rand(n_terms, generator=torch.Generator().manual_seed(b), dtype=torch.float64).to(dtype) + 0.5
    got, g_got = _loss_and_grads(lambda: contrastive_terms(_peers(zs, crops), taus, tau_kl, pairs, tile), zs,
                                 weights)
    # the reference in float64 whatever the kernel's dtype
    zs64 = [z.detach().double().requires_grad_() for z in zs]
    ref, g_ref = _loss_and_grads(lambda: reference_terms(_peers(zs64, crops), taus, tau_kl, pairs), zs64,
                                 weights.double())
    assert got.dtype == dtype and got.shape == (n_terms,)
    assert _rel_err(got, ref) < tol, (got, ref)
    for a, r in zip(g_got, g_ref):
        assert _rel_err(a, r) < tol


def test_multi_crop_ntxent_is_solo_learns_loss_written_out():
    """solo-learn's simclr_loss_func, line by line at world size 1: exp of the similarities, positives where the
    image index matches but not the diagonal, -log(sum_pos / sum_non_self), mean over every crop of every image."""
    b, crops, tau = 6, 4, 0.2
    zs = _embeddings(b, 5, crops, seed=3)
    z = torch.cat(zs)
    indexes = torch.arange(b).repeat(crops)
    sim = torch.exp(z @ z.T / tau)
    pos_mask = indexes[:, None] == indexes[None, :]
    pos_mask.fill_diagonal_(False)
    neg_mask = indexes[:, None] != indexes[None, :]
    pos = (sim * pos_mask).sum(1)
    neg = (sim * neg_mask).sum(1)
    theirs = -torch.mean(torch.log(pos / (pos + neg)))
    ours = contrastive_terms([zs], (tau,), tile=4)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(ours, zs)
    g_theirs = torch.autograd.grad(theirs, zs)
    for a, t in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("taus, tau_kl", [((0.5, 0.2), 0.1), ((None, 0.3), 0.2), ((0.2, 0.4), None)])
@pytest.mark.parametrize("crops", [2, 3])
def test_peers_with_different_embedding_sizes(taus, tau_kl, crops):
    """A BYOL peer (256 wide) beside a SimCLR peer (128), a VICReg expander beside either: each peer's own size."""
    g = torch.Generator().manual_seed(7)
    zs = [F.normalize(torch.randn(9, d, generator=g, dtype=torch.float64), dim=1).requires_grad_()
          for d in (6,) * crops + (11,) * crops]
    pairs = ((0, 1), (0, 2)) if crops == 3 else ((0, 1),)
    weights = torch.rand(2 + (2 if tau_kl else 0) - sum(t is None for t in taus), generator=g, dtype=torch.float64)
    got, g_got = _loss_and_grads(lambda: contrastive_terms(_peers(zs, crops), taus, tau_kl, pairs, 4), zs,
                                 weights + 0.5)
    ref, g_ref = _loss_and_grads(lambda: reference_terms(_peers(zs, crops), taus, tau_kl, pairs), zs,
                                 weights + 0.5)
    assert _rel_err(got, ref) < 1e-10
    for a, r in zip(g_got, g_ref):
        assert _rel_err(a, r) < 1e-10


@pytest.mark.parametrize("tile", [1, 3, 16])
@pytest.mark.parametrize("crops", [2, 3])
def test_gradcheck_simclr(tile, crops):
    zs = _embeddings(5, 4, crops, seed=tile)
    assert torch.autograd.gradcheck(lambda *z: contrastive_terms([list(z)], (0.3,), None, tile=tile), tuple(zs))


@pytest.mark.parametrize("tile", [2, 16])
@pytest.mark.parametrize("crops, kl_pairs", [(2, ((0, 1),)), (3, ((0, 1), (0, 2), (1, 2)))])
def test_gradcheck_dogo_each_peer_against_a_fixed_peer(tile, crops, kl_pairs):
    """KL(P_peer || P_k) is differentiated through peer k only (the peer is detached by definition), so gradcheck
    each peer's NT-Xent and KL with the other peer's embeddings held as constants."""
    a = _embeddings(5, 4, crops, seed=10 + tile)
    b = _embeddings(5, 4, crops, seed=20 + tile)
    fixed_a, fixed_b = [z.detach() for z in a], [z.detach() for z in b]
    taus, tau_kl = (0.3, 0.4), 0.2
    peer_a = lambda *x: contrastive_terms([list(x), fixed_b], taus, tau_kl, kl_pairs, tile)[[0, 2]]
    peer_b = lambda *x: contrastive_terms([fixed_a, list(x)], taus, tau_kl, kl_pairs, tile)[[1, 3]]
    assert torch.autograd.gradcheck(peer_a, tuple(a))
    assert torch.autograd.gradcheck(peer_b, tuple(b))


def test_bf16_embeddings_accumulate_in_float32():
    zs = _embeddings(9, 16, 6, seed=5, dtype=torch.bfloat16)
    got = contrastive_terms(_peers(zs, 3), (0.1, 0.2), 0.1, ((0, 1), (1, 2)), tile=4)
    assert got.dtype == torch.float32
    grads = torch.autograd.grad(got.sum(), zs)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    # exactly the float32 computation on the bf16-rounded values (the kernel upcasts, it does not round logits)
    zs32 = [z.detach().float().requires_grad_() for z in zs]
    ref = contrastive_terms(_peers(zs32, 3), (0.1, 0.2), 0.1, ((0, 1), (1, 2)), tile=4)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_named():
    zs = _embeddings(4, 3, 4, seed=0)
    with pytest.raises(ValueError, match="crops of each peer"):
        contrastive_terms(_peers(zs, 2), (0.1,))
    with pytest.raises(ValueError, match="exactly 2 peers"):
        contrastive_terms([zs[:2]], (0.1,), tau_kl=0.1)
    with pytest.raises(ValueError, match="tile"):
        contrastive_terms(_peers(zs, 2), (0.1, 0.1), tile=0)
    with pytest.raises(ValueError, match="at least 2 crops"):
        contrastive_terms([zs[:1]], (0.1,))
    with pytest.raises(ValueError, match=r"KL pair \(0, 2\): two different crops both peers have"):
        contrastive_terms(_peers(zs, 2), (0.1, 0.1), 0.1, ((0, 2),))
    with pytest.raises(ValueError, match="same b images"):
        contrastive_terms([zs[:2], [z[:3] for z in zs[2:]]], (0.1, 0.1))


@pytest.mark.slow
def test_bench_loss_writes_both_versions(tmp_path):
    import json
    from tests.helpers import run_cli
    out = tmp_path / "loss.json"
    run_cli("bench", "loss", "--views", "64", "256", "--tile", "32", "--repeats", "1", "--json", str(out))
    result = json.loads(out.read_text())
    assert [r["views"] for r in result["results"]] == [64, 256]
    for row in result["results"]:
        for version in ("kernel", "straightforward"):
            assert row[version]["peak_bytes"] > 0 and row[version]["seconds_median"] > 0
        assert row["memory_ratio"] > 0 and row["time_ratio"] > 0
    assert result["environment"]["device"] == "cpu" and result["tile_images"] == 32

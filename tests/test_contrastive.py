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


CASES = [  # (images b, dim d, tile, temperatures, tau_kl or None for SimCLR)
    (8, 16, 4, (0.5,), None),  # tile divides the batch
    (11, 8, 4, (0.1,), None),  # last tile short
    (7, 5, 1, (0.2, 0.3), 0.1),  # one image per tile
    (13, 16, 5, (0.1, 0.5), 0.5),
    (6, 32, 64, (1.0, 0.07), 0.1),  # one tile covers everything
    (20, 12, 7, (0.3, 0.3, 0.2), None),  # three peers, SimCLR each
]


@pytest.mark.parametrize("b,d,tile,taus,tau_kl", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_kernel_equals_straightforward(b, d, tile, taus, tau_kl, dtype, tol):
    zs = _embeddings(b, d, 2 * len(taus), seed=b * 100 + d + tile, dtype=dtype)
    n_terms = len(taus) + (2 if tau_kl else 0)
    weights = torch.rand(n_terms, generator=torch.Generator().manual_seed(b), dtype=torch.float64).to(dtype) + 0.5
    got, g_got = _loss_and_grads(lambda: contrastive_terms(zs, taus, tau_kl, tile), zs, weights)
    # the reference in float64 whatever the kernel's dtype
    zs64 = [z.detach().double().requires_grad_() for z in zs]
    ref, g_ref = _loss_and_grads(lambda: reference_terms(zs64, taus, tau_kl), zs64, weights.double())
    assert got.dtype == dtype and got.shape == (n_terms,)
    assert _rel_err(got, ref) < tol, (got, ref)
    for a, r in zip(g_got, g_ref):
        assert _rel_err(a, r) < tol


@pytest.mark.parametrize("taus, tau_kl", [((0.5, 0.2), 0.1), ((None, 0.3), 0.2), ((0.2, 0.4), None)])
def test_peers_with_different_embedding_sizes(taus, tau_kl):
    """A BYOL peer (256 wide) beside a SimCLR peer (128), a VICReg expander beside either: each peer's own size."""
    g = torch.Generator().manual_seed(7)
    zs = [F.normalize(torch.randn(9, d, generator=g, dtype=torch.float64), dim=1).requires_grad_()
          for d in (6, 6, 11, 11)]
    weights = torch.rand(2 + (2 if tau_kl else 0) - sum(t is None for t in taus), generator=g, dtype=torch.float64)
    got, g_got = _loss_and_grads(lambda: contrastive_terms(zs, taus, tau_kl, 4), zs, weights + 0.5)
    ref, g_ref = _loss_and_grads(lambda: reference_terms(zs, taus, tau_kl), zs, weights + 0.5)
    assert _rel_err(got, ref) < 1e-10
    for a, r in zip(g_got, g_ref):
        assert _rel_err(a, r) < 1e-10


@pytest.mark.parametrize("tile", [1, 3, 16])
def test_gradcheck_simclr(tile):
    zs = _embeddings(5, 4, 2, seed=tile)
    assert torch.autograd.gradcheck(lambda *z: contrastive_terms(z, (0.3,), None, tile), tuple(zs))


@pytest.mark.parametrize("tile", [2, 16])
def test_gradcheck_dogo_each_peer_against_a_fixed_peer(tile):
    """KL(P_peer || P_k) is differentiated through peer k only (the peer is detached by definition), so gradcheck
    each peer's NT-Xent and KL with the other peer's embeddings held as constants."""
    a1, a2, b1, b2 = _embeddings(5, 4, 4, seed=10 + tile)
    fixed = [z.detach() for z in (a1, a2, b1, b2)]
    taus, tau_kl = (0.3, 0.4), 0.2
    peer_a = lambda x1, x2: contrastive_terms((x1, x2, fixed[2], fixed[3]), taus, tau_kl, tile)[[0, 2]]
    peer_b = lambda x1, x2: contrastive_terms((fixed[0], fixed[1], x1, x2), taus, tau_kl, tile)[[1, 3]]
    assert torch.autograd.gradcheck(peer_a, (a1, a2))
    assert torch.autograd.gradcheck(peer_b, (b1, b2))


def test_bf16_embeddings_accumulate_in_float32():
    zs = _embeddings(9, 16, 4, seed=5, dtype=torch.bfloat16)
    got = contrastive_terms(zs, (0.1, 0.2), 0.1, tile=4)
    assert got.dtype == torch.float32
    grads = torch.autograd.grad(got.sum(), zs)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    # exactly the float32 computation on the bf16-rounded values (the kernel upcasts, it does not round logits)
    zs32 = [z.detach().float().requires_grad_() for z in zs]
    ref = contrastive_terms(zs32, (0.1, 0.2), 0.1, tile=4)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_named():
    zs = _embeddings(4, 3, 4, seed=0)
    with pytest.raises(ValueError, match="two views per peer"):
        contrastive_terms(zs[:3], (0.1, 0.1))
    with pytest.raises(ValueError, match="exactly 2 peers"):
        contrastive_terms(zs[:2], (0.1,), tau_kl=0.1)
    with pytest.raises(ValueError, match="tile"):
        contrastive_terms(zs, (0.1, 0.1), tile=0)


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
